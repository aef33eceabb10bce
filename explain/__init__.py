"""CAM engine, localisation metrics and Ray Data extraction to Parquet."""
