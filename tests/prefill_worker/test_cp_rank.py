"""A context-parallel rank computes with the cluster's engine settings, as the engines do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from splitserve.cluster.redis_server import free_port
from splitserve.engine.cpu_linear import PackedLinear
from splitserve.prefill_worker.cp import CPRank


@pytest.mark.parametrize("kernel, packed", [("torch", False), ("onednn", True)])
def test_a_rank_multiplies_with_the_linear_kernel_it_is_given(llama_dir: Path, kernel: str, packed: bool) -> None:
    rank = CPRank(str(llama_dir), rank=0, world=1, store=f"127.0.0.1:{free_port()}", block_size=16, sender_id="cp-test", dtype="float32",
                  linear_kernel=kernel)
    try:
        linears = [m for m in rank.model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
        assert linears and all(isinstance(m, PackedLinear) == packed for m in linears)
    finally:
        rank.close()


def test_an_unknown_kernel_is_refused_naming_it(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="linear_kernel.*'mkl'"):
        CPRank(str(llama_dir), rank=0, world=1, store=f"127.0.0.1:{free_port()}", block_size=16, sender_id="cp-test", dtype="float32",
               linear_kernel="mkl")


def test_on_cuda_each_rank_has_a_gpu_of_its_own() -> None:
    from splitserve.prefill_worker.cp import rank_device

    assert rank_device("cpu", 1, 2, True) == torch.device("cpu") and rank_device("cuda", 0, 1, True, gpus=1) == torch.device("cuda")
    # followers started on rank 0's node share its GPUs: one each
    assert rank_device("cuda", 1, 2, True, gpus=2) == torch.device("cuda", 1) and rank_device("cuda:2", 1, 2, True, gpus=4) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="needs GPUs 0..3; this node has 2"):
        rank_device("cuda", 0, 4, True, gpus=2)
    assert rank_device("cuda", 1, 2, False, gpus=1) == torch.device("cuda")  # placed by Ray: each sees only its own


@pytest.mark.parametrize("keepalive_s, survives", [(0.5, True), (1000.0, False)])
def test_an_idle_group_stays_whole_while_rank_0_keeps_it_alive(llama_dir: Path, keepalive_s: float, survives: bool) -> None:
    """Followers wait for jobs in a broadcast whose timeout (a day; 1.5 s here) would end them:
    rank 0's keep-alive must reach them first (without it, here, the follower leaves)."""
    import datetime
    import time

    from splitserve.prefill_worker.cp import start_group

    group = start_group(str(llama_dir), world=2, block_size=16, worker_id=f"idle-{survives}", dtype="float32",
                        idle_timeout=datetime.timedelta(seconds=1.5), keepalive_s=keepalive_s)
    (follower,) = group.followers
    try:
        time.sleep(3.5)
        assert (follower.poll() is None) == survives
    finally:
        group.close()
    assert follower.wait(30) == 0 if survives else follower.returncode not in (0, None)  # it left in step, or had left


def test_a_rank_lost_while_idle_marks_the_group_broken_at_the_next_keep_alive(llama_dir: Path) -> None:
    """The keep-alive also finds a follower that died between jobs: the group says it is broken
    (the next request is refused UNAVAILABLE at once, and the controller replaces the group)."""
    import time

    from splitserve.prefill_worker.cp import start_group

    group = start_group(str(llama_dir), world=2, block_size=16, worker_id="lost", dtype="float32", keepalive_s=0.5)
    try:
        group.followers[0].kill()
        end = time.monotonic() + 30
        while group.broken is None and time.monotonic() < end:
            time.sleep(0.1)
        assert group.broken is not None and "lost a rank while idle" in group.broken
    finally:
        group.close()


def test_a_rank_that_cannot_reach_the_decode_worker_fails_the_request_on_every_rank(llama_dir: Path) -> None:
    """Rank 1 cannot open a sender to the decode worker (here: the in-process transport, with
    no hub on its side); rank 0 can. Both must fail the request at once, naming why, instead of
    rank 0 waiting in the first layer's collective for a rank that left; rank 0 aborts the
    reservation it reached (nothing held on the decode side), and the group stays usable."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from splitserve.decode_worker.worker import DecodeWorker
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.kv_transfer.local import LocalHub
    from splitserve.prefill_worker.cp import CPError, CPJob, descriptor_to_dict
    from splitserve.prefill_worker.pushers import PusherPool

    hub = LocalHub()
    decode = DecodeWorker(LLMEngine(EngineConfig(model=str(llama_dir), dtype="float32")), "d-cp", transports=("local",),
                          default_transport="local", hub=hub)
    store = f"127.0.0.1:{free_port()}"
    with ThreadPoolExecutor(2) as pool:
        ranks = list(pool.map(lambda r: CPRank(str(llama_dir), rank=r, world=2, store=store, block_size=16, sender_id="cp-agree", dtype="float32"),
                              range(2)))
        try:
            ranks[0].pushers = PusherPool("cp-agree-r0", ranks[0].layout, hub=hub)  # rank 1 keeps its pool without a hub
            params = SamplingParams(temperature=0.0, max_tokens=4)
            desc = decode.reserve("cp-agree-1", list(range(1, 41)), params, "local")
            assert decode.stats()["reserved_blocks"] > 0
            job = CPJob("cp-agree-1", list(range(1, 41)), {"temperature": 0.0, "max_tokens": 4}, descriptor_to_dict(desc))
            runs = [pool.submit(rank.run, job) for rank in ranks]
            errors = [r.exception(timeout=60) for r in runs]  # a rank left waiting in a collective would time out here
            # both give the status and reason rank 1 saw (a misconfiguration: INTERNAL); rank 0 answers the request
            assert all(isinstance(e, CPError) and e.status == "INTERNAL" and not e.group_broken and not e.receiver_lost for e in errors), errors
            assert all(str(e).startswith("rank 1: cannot reach decode worker d-cp") and "no LocalHub here" in str(e) for e in errors), errors
            end = time.monotonic() + 10
            while (held := decode.stats())["reserved_blocks"] and time.monotonic() < end:
                time.sleep(0.05)
            assert held["reserved_blocks"] == 0 and held["active_transfers"] == 0
            assert list(pool.map(lambda rank: rank.agree(rank.rank == 1), ranks)) == [True, True]  # the group still meets
        finally:
            for rank in ranks:
                rank.close()
            decode.close()
