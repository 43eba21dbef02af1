"""router/grpc_api.py's Generate, without a server: the watch on a caller that reads nothing."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from splitserve.proto import public_pb2
from splitserve.router.grpc_api import GenerationService
from splitserve.router.orchestrator import Chunk


class _Orchestrator:
    def __init__(self) -> None:
        self.closed = False

    async def encoded(self, prompt):
        return prompt

    def generate(self, inp):
        async def stream():
            try:
                for i in range(100):
                    yield Chunk("r", [i], [0.0], f"t{i}")
                    await asyncio.sleep(0)
            finally:
                self.closed = True

        return stream()


def test_a_caller_that_leaves_at_a_write_leaves_no_watch_behind(caplog) -> None:
    """A caller that cancelled while a message was being written left its watch armed: it
    fired `send_timeout` later, logging that it aborted a request that had already ended."""

    async def run() -> None:
        orch = _Orchestrator()
        service = GenerationService(orch, frozenset(), send_timeout=0.05)
        calls = service.Generate(public_pb2.GenerateRequest(text="hi"), SimpleNamespace())
        await anext(calls)
        await calls.aclose()  # what grpc.aio does to the handler of a call its caller cancelled
        await asyncio.sleep(0.2)
        assert orch.closed

    with caplog.at_level(logging.WARNING, logger="splitserve.router.grpc_api"):
        asyncio.run(run())
    assert not [r for r in caplog.records if "read nothing" in r.getMessage()]
