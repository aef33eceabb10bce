"""Data readers, RLE, synthetic SIIM-format data, preprocessing, the model registry and training."""
