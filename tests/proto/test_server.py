"""proto/server.py's servers refuse a port another server holds (gRPC shares it by default)."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.proto.server import start_aio_server, start_server


def test_a_second_server_on_a_port_in_use_fails_to_bind() -> None:
    """With gRPC's default SO_REUSEPORT a second router on the same port started normally and
    took a random share of the first one's calls."""

    async def run() -> None:
        first, port = await start_aio_server("127.0.0.1", 0, lambda s: None, [])
        try:
            with pytest.raises(OSError, match=f"cannot bind gRPC server to 127.0.0.1:{port}"):
                await start_aio_server("127.0.0.1", port, lambda s: None, [])
            with pytest.raises(OSError, match=f"cannot bind gRPC server to 127.0.0.1:{port}"):
                start_server("127.0.0.1", port, lambda s: None, [])
        finally:
            await first.stop(0)

    asyncio.run(run())
