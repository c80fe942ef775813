"""The HTTP API's routes, one module per area, on FastAPI (which generates the OpenAPI
document from their signatures and the bodies in :mod:`gateway.api.schemas`)."""
