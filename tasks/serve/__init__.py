"""Serving: inference on images, the `abair restore` command (with JPEG quality estimation), the
MLflow pyfunc."""
