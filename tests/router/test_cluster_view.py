"""The router's view of the cluster says when it is the registry, not the workers, that failed."""

from __future__ import annotations

import time

from splitserve.router.cluster_view import ClusterView


def test_an_unreadable_registry_is_named_once_the_view_is_stale() -> None:
    answers: list[object] = [[], ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")]

    def source():
        answer = answers[0] if len(answers) == 1 else answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    never = ClusterView(lambda: (_ for _ in ()).throw(TimeoutError("Timeout reading from socket")), stale_seconds=0.2)
    assert not never.refresh()
    assert never.stale() == "the cluster registry (Redis) has not answered since this router started: TimeoutError: Timeout reading from socket"

    view = ClusterView(source, stale_seconds=0.2)
    assert view.refresh() and view.stale() is None  # it answered: an empty pool is the workers' state
    assert not view.refresh()
    assert view.stale() is None  # not yet stale: the last view still counts
    time.sleep(0.3)
    reason = view.stale()
    assert reason.startswith("the cluster registry (Redis) has not answered for ") and reason.endswith(" s: ConnectionError: Error 111 "
                                                                                                      "connecting to 127.0.0.1:6379. Connection refused.")
