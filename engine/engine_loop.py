"""Runs an `LLMEngine` on its own thread, the one thread that ever touches it.

Life cycle: start() -> [run submitted calls; idle hook; step() while there is work] -> stop().
Other threads (RPC handlers, transfer threads) reach the engine only through `call` / `submit`,
which run a function on the loop thread between two steps. If a step raises, the loop stops,
`on_crash` is told, and every later call fails at once instead of hanging.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from splitserve.engine.engine import LLMEngine, RequestOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineLoopStopped(RuntimeError):
    status = "UNAVAILABLE"


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[RequestOutput]], None],
        *,
        idle_hook: Callable[[], None] | None = None,
        on_crash: Callable[[BaseException], None] | None = None,
        tick_seconds: float = 0.05,
        name: str = "engine-loop",
    ) -> None:
        self.engine = engine
        self._on_outputs = on_outputs
        self._idle_hook = idle_hook
        self._on_crash = on_crash
        self._tick = tick_seconds
        self._calls: queue.Queue[tuple[Callable[[LLMEngine], object], Future] | None] = queue.Queue()
        self._stopped: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._calls.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def submit(self, fn: Callable[[LLMEngine], T]) -> "Future[T]":
        future: Future = Future()
        if self._stopped is not None:
            future.set_exception(EngineLoopStopped(f"engine loop stopped: {self._stopped}"))
            return future
        if threading.current_thread() is self._thread:  # already on the loop: run now
            _run_call(fn, self.engine, future)
            return future
        self._calls.put((fn, future))
        return future

    def call(self, fn: Callable[[LLMEngine], T], timeout: float | None = 30.0) -> T:
        return self.submit(fn).result(timeout)

    def kv_events(self, snapshot: bool) -> tuple[list, list[int] | None]:
        """The block pool's prefix-cache events since the last call, and with `snapshot` its
        whole cached set, read together between two steps (so the two agree)."""
        return self.call(lambda e: (e.pool.drain_events(), e.pool.cached_hashes() if snapshot else None))

    # ---- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain_calls(block=not self.engine.has_unfinished_requests()):
                if self._idle_hook is not None:
                    self._idle_hook()
                if self.engine.has_unfinished_requests():
                    self._on_outputs(self.engine.step())
                    self.steps += 1
        except BaseException as e:  # a broken engine must not leave callers waiting
            logger.exception("engine loop crashed")
            self._stopped = e
            if self._on_crash is not None:
                self._on_crash(e)
        else:
            self._stopped = EngineLoopStopped("stopped")
        self._fail_pending()

    def _drain_calls(self, block: bool) -> bool:
        """Run every queued call; wait up to one tick for the first when idle. False = stop."""
        try:
            item = self._calls.get(timeout=self._tick) if block else self._calls.get_nowait()
        except queue.Empty:
            return True
        while item is not None:
            _run_call(*item[:1], self.engine, item[1])
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return True
        return False

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(EngineLoopStopped(f"engine loop stopped: {self._stopped}"))


def _run_call(fn: Callable[[LLMEngine], object], engine: LLMEngine, future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(engine))
    except BaseException as e:
        future.set_exception(e)
