"""MLOps: MLflow tracking and registry, cluster jobs, container image references."""
