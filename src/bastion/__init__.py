"""Bastion: a model server with its defenses in the request path."""

__version__ = "0.1.0"
