"""The HTTP transport: a thin ASGI adapter over `bastion.service`."""
