"""Loopback ports for the servers the project starts itself (Redis, the ranking service, torchrun rendezvous)."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on now; the caller binds it a moment later (a race the callers accept)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
