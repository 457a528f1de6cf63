"""Running ember on orchestrators: Kubernetes manifests (ember.deploy.kubernetes)."""
