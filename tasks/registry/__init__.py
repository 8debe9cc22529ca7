"""The MLflow model registry: versions, registration, the promotion gate, add-degradation."""
