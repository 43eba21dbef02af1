"""Supervision under Ray: a worker whose restarts are used up is replaced by the controller, and
a context-parallel group that lost a rank is replaced as a whole."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml

from splitserve.proto.client import Client, SplitserveError
from tests.e2e.procs import wait_until
from tests.e2e.serve_proc import start_serve


def ray_processes(title: str) -> list[int]:
    """Pids of Ray worker processes whose title starts with `ray::TITLE`."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{title}".encode()):
                    out.append(int(pid))
            except OSError:
                continue
    return out


@pytest.fixture(scope="module")
def serve(e2e_model: Path, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("supervision") / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(e2e_model), "dtype": "float32"}, "max_restarts": 0, "prefill": {"cp_degree": 2},
                                   "kv_transfer": {"transport": "torch"}, "routing": {"local_prefill_tokens": 0},
                                   "heartbeat_seconds": 0.5, "heartbeat_ttl_seconds": 2.0}))
    s = start_serve("--config", str(cfg))
    yield s
    s.stop()


def workers(c: Client, role: str) -> list:
    return [w for w in c.status().workers if w.role == role and w.state == "ready"]


def test_a_decode_worker_past_its_restarts_is_replaced(serve) -> None:
    with Client(serve.grpc, timeout=60) as c:
        (victim,) = workers(c, "decode")
        os.kill(victim.pid, signal.SIGKILL)  # max_restarts 0: Ray will not bring it back
        wait_until(lambda: [w.worker_id for w in workers(c, "decode")] not in ([], [victim.worker_id]), 120, "a replacement decode worker", ignore=(SplitserveError,), poll=0.2)
        (new,) = workers(c, "decode")
        assert new.worker_id != victim.worker_id and new.pid != victim.pid
        wait_until(lambda: c.generate("after the replacement", max_tokens=4, temperature=0).finish_reason == "length", 60, "serving again", ignore=(SplitserveError,), poll=0.2)


def test_a_context_parallel_group_that_lost_a_rank_is_replaced(serve) -> None:
    with Client(serve.grpc, timeout=60) as c:
        (group,) = workers(c, "prefill")
        assert c.generate([5] * 300, max_tokens=4, temperature=0).finish_reason == "length"
        (rank,) = ray_processes("CPRankActor")
        os.kill(rank, signal.SIGKILL)
        with pytest.raises(SplitserveError) as e:  # the first request to find the rank gone fails, naming it
            c.generate([6] * 300, max_tokens=4, temperature=0)
        assert e.value.status == "UNAVAILABLE"
        wait_until(lambda: [w.worker_id for w in workers(c, "prefill")] not in ([], [group.worker_id]), 180, "a replacement CP group", ignore=(SplitserveError,), poll=0.2)
        wait_until(lambda: c.generate([7] * 300, max_tokens=4, temperature=0).finish_reason == "length", 60, "serving again", ignore=(SplitserveError,), poll=0.2)
        assert len(ray_processes("CPRankActor")) == 1  # the broken group's ranks are gone
