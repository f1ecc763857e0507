"""Talking to a segserve server: the Python SDK (``Client``, ``AsyncClient``), and the CLI commands built on it."""

from gateway.client.sdk import AsyncClient, Client, SegserveError, verify_webhook

__all__ = ["AsyncClient", "Client", "SegserveError", "verify_webhook"]
