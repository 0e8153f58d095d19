"""Moved to `bastion.openapi` (the document describes the core's routes, and stages serve it without
importing the HTTP package); this name stays importable."""

from bastion.openapi import OPENAPI

__all__ = ["OPENAPI"]
