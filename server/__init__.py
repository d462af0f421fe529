"""What runs in the data centre: the ServerApp, the model registry, the HTTP server."""
