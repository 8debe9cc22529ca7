"""The MLflow model registry: the store (client, references, aliases, downloads), registering
components and the restorer, the promotion gate, and add-degradation."""
