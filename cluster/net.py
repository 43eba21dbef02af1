"""Loopback helpers for processes that start other processes."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise OSError naming `what` when `port` (not 0) on `host` is taken, before minutes of
    start-up would end in the same error."""
    if port == 0:
        return
    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as e:
        raise OSError(f"{what}: cannot listen on {host}:{port}: {e.strerror or e}") from None
