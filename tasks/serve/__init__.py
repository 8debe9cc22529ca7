"""Serving: inference on images, the `abair restore` command, the MLflow pyfunc."""
