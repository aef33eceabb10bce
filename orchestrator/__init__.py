"""CLI, typed config, the stage pipeline, Ray and MLflow set-up."""
