"""The push gateway (websockets) and the HTTP API with the live dashboard."""
