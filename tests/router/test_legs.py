"""router/legs.py: how a worker's refusal reads to the router's client."""

from __future__ import annotations

import asyncio

import grpc

from splitserve.router.legs import WorkerClient


def test_a_worker_refusing_the_routers_token_is_the_clusters_fault_not_the_clients() -> None:
    """A router started without the workers' cluster_token relayed their UNAUTHENTICATED: a
    client with a valid API key was told it was unauthenticated."""

    async def run() -> None:
        w = WorkerClient("127.0.0.1:1", worker_id="decode-1")
        try:
            e = w.error(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-splitserve-token", "decode", "reserve")
            assert e.status == "INTERNAL" and "cluster_token" in str(e) and "decode worker decode-1" in str(e)
            assert w.error(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", "decode", "reserve").status == "RESOURCE_EXHAUSTED"
        finally:
            await w.close()

    asyncio.run(run())
