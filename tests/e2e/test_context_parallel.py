"""Context-parallel prefill end to end: an ~8,000-token prompt prefilled by CP groups of 2 and 4
ranks (separate processes, gloo), decoded on a decode worker, gives exactly the single
engine's greedy tokens; a rank that dies mid-prefill fails the request cleanly."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from splitserve.engine import LLM, SamplingParams
from splitserve.prefill_worker.cp import follower_parser, follower_rank_args
from splitserve.proto.status import StatusError
from splitserve.router.legs import run_disaggregated
from tests.e2e.workers import WorkerStub

# greedy, with processors that read the whole prompt (the first token is sampled by rank 0)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.2, presence_penalty=0.5, top_logprobs=3)


@pytest.fixture(scope="module")
def long_model(make_checkpoint) -> Path:
    return make_checkpoint(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, max_position_embeddings=16384, seed=21)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    rng = random.Random(7)
    return [rng.randrange(3, 500) for _ in range(7993)]  # not a multiple of 2N or of the block size


@pytest.fixture(scope="module")
def expected(long_model: Path, prompt: list[int]):
    return LLM(str(long_model), dtype="float32").generate([prompt], GREEDY)[0]


@pytest.fixture(scope="module")
def decode(spawn, long_model: Path) -> WorkerStub:
    return WorkerStub(spawn("splitserve.decode_worker", "--model", str(long_model), "--dtype", "float32", "--transports", "grpc,torch").address)


def reserved(d: WorkerStub) -> int:
    s = d.stats()
    return s.reserved_blocks + s.active_transfers


@pytest.mark.slow
@pytest.mark.parametrize("cp, transport", [(2, "torch"), (4, "grpc")])
def test_cp_prefill_then_decode_equals_single_engine(spawn, long_model, prompt, expected, decode, cp: int, transport: str) -> None:
    group = spawn("splitserve.prefill_worker", "--model", str(long_model), "--dtype", "float32", "--cp-degree", str(cp))
    r = run_disaggregated(group.address, decode.address, f"cp{cp}", prompt, GREEDY, transport=transport, timeout=300)
    assert r.token_ids == expected.token_ids
    assert [[t for t, _ in top] for top in r.top_logprobs] == [[t for t, _ in top] for top in expected.top_logprobs]
    assert reserved(decode) == 0
    group.stop()


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def under_way(group, decode: WorkerStub, rid: str, prompt: list[int], transport: str) -> tuple[threading.Thread, list[BaseException]]:
    """Start the request on a thread; return once the decode worker holds its reservation."""
    errors: list[BaseException] = []

    def client() -> None:
        try:
            run_disaggregated(group.address, decode.address, rid, prompt, GREEDY, transport=transport, timeout=120)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=client)
    t.start()
    end = time.monotonic() + 60
    while reserved(decode) == 0 and time.monotonic() < end:
        time.sleep(0.05)
    return t, errors


def test_a_rank_dying_mid_prefill_fails_the_request_and_frees_the_reservation(spawn, long_model, prompt, decode) -> None:
    import os
    import signal

    group = spawn("splitserve.prefill_worker", "--model", str(long_model), "--dtype", "float32", "--cp-degree", "2")
    (follower,) = children(group.popen.pid)
    t, errors = under_way(group, decode, "cp-kill", prompt * 2, "torch")
    time.sleep(0.5)
    os.kill(follower, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "the caller hung after a CP rank died"
    assert len(errors) == 1 and isinstance(errors[0], StatusError) and errors[0].status == "UNAVAILABLE", errors
    end = time.monotonic() + 15
    while reserved(decode) and time.monotonic() < end:
        time.sleep(0.1)
    assert reserved(decode) == 0
    with pytest.raises(StatusError) as again:  # the broken group refuses work until restarted
        run_disaggregated(group.address, decode.address, "cp-after", prompt[:100], GREEDY, timeout=30)
    assert again.value.status == "UNAVAILABLE" and "broken" in str(again.value)
    assert reserved(decode) == 0


def test_the_decode_worker_dying_mid_transfer_fails_the_request_not_the_group(spawn, long_model, prompt, expected, decode) -> None:
    """The decode worker the group streams a prompt's KV to dies: the request fails on its decode
    leg (the router retries it on another decode worker), and the group, whose ranks are all
    well, serves the next request (it was marked broken and refused work until restarted)."""
    import os
    import signal

    from splitserve.router.legs import LegError

    group = spawn("splitserve.prefill_worker", "--model", str(long_model), "--dtype", "float32", "--cp-degree", "2")
    victim_proc = spawn("splitserve.decode_worker", "--model", str(long_model), "--dtype", "float32", "--transports", "grpc")
    victim = WorkerStub(victim_proc.address)
    t, errors = under_way(group, victim, "cp-receiver-dies", prompt, "grpc")
    time.sleep(0.3)
    os.kill(victim_proc.popen.pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "the caller hung after the decode worker died"
    assert len(errors) == 1 and isinstance(errors[0], LegError) and errors[0].status == "UNAVAILABLE", errors
    assert errors[0].leg == "decode", str(errors[0])
    r = run_disaggregated(group.address, decode.address, "cp-after-receiver", prompt, GREEDY, transport="grpc", timeout=300)
    assert r.token_ids == expected.token_ids
    assert reserved(decode) == 0


def test_serve_with_a_cp_prefill_group(long_model: Path) -> None:
    from splitserve.proto.client import Client
    from tests.e2e.serve_proc import start_serve

    prompt = [3 + (i * 13) % 490 for i in range(700)]
    expected = LLM(str(long_model), dtype="float32").generate([prompt], GREEDY)[0].token_ids
    serve = start_serve("--model", str(long_model), "--dtype", "float32", "--prefill-cp", "2", "--transport", "torch")
    try:
        with Client(serve.grpc) as c:
            got = c.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.2, presence_penalty=0.5)
            assert got.token_ids == expected
    finally:
        serve.stop()


def test_cp_group_sends_only_what_the_decode_worker_lacks(spawn, long_model: Path, decode: WorkerStub) -> None:
    """Turn 2 of a conversation through a CP group: the decode worker holds turn 1, each rank
    skips the blocks it already has, and the tokens equal the single engine's."""
    single = LLM(str(long_model), dtype="float32")
    group = spawn("splitserve.prefill_worker", "--model", str(long_model), "--dtype", "float32", "--cp-degree", "2")
    turn1 = [3 + (i * 17) % 480 for i in range(900)]
    r1 = run_disaggregated(group.address, decode.address, "cp-turn1", turn1, GREEDY, transport="torch", timeout=120)
    assert r1.token_ids == single.generate([turn1], GREEDY)[0].token_ids
    turn2 = turn1 + r1.token_ids + [5 + (i * 7) % 400 for i in range(300)]
    before = decode.stats().kv_bytes_received
    r2 = run_disaggregated(group.address, decode.address, "cp-turn2", turn2, GREEDY, transport="torch", timeout=120)
    assert r2.token_ids == single.generate([turn2], GREEDY)[0].token_ids
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    assert decode.stats().kv_bytes_received - before <= (-(-len(turn2) // 16) - (len(turn1) + 11) // 16) * block_bytes
    assert reserved(decode) == 0
    group.stop()


def test_the_workers_engine_flags_reach_every_rank_of_its_cp_group(spawn, long_model: Path, decode: WorkerStub) -> None:
    """`--linear-kernel` and `--num-threads` of a CP prefill worker reach the ranks it starts
    (they were dropped: the ranks multiplied with the default kernel whatever was configured)."""
    group = spawn("splitserve.prefill_worker", "--model", str(long_model), "--dtype", "float32", "--cp-degree", "2", "--linear-kernel", "onednn",
                  "--num-threads", "1")
    (follower,) = children(group.popen.pid)
    argv = Path(f"/proc/{follower}/cmdline").read_bytes().decode().split("\0")
    parser = follower_parser()  # the follower's own reading of its command line
    rank_args = follower_rank_args(parser, parser.parse_args(argv[argv.index("splitserve.prefill_worker.cp") + 1 : -1]))
    assert (rank_args["linear_kernel"], rank_args["num_threads"], rank_args["gpu_per_rank"]) == ("onednn", 1, True)
    prompt = [3 + (i * 11) % 470 for i in range(600)]
    r = run_disaggregated(group.address, decode.address, "cp-onednn", prompt, GREEDY, transport="grpc", timeout=120)
    assert r.token_ids == LLM(str(long_model), dtype="float32", linear_kernel="onednn").generate([prompt], GREEDY)[0].token_ids
    group.stop()


def test_a_stopped_rank_marks_the_group_broken_and_requests_are_refused_at_once(spawn, long_model, prompt) -> None:
    """A follower that stops (SIGSTOP: a hung host or GPU) keeps its connections, so the group's
    collectives would wait 30 minutes. The request under way fails at its lease, and once the job
    has made no progress for STALL_MIN_SECONDS (here: more than 4 leases of 2 s) the group says
    it is broken: requests are refused UNAVAILABLE at once, naming why (before, each queued behind
    the stuck job until its own lease ran out, and the group never said it was broken)."""
    import os
    import signal

    from splitserve.prefill_worker.cp import STALL_MIN_SECONDS

    group = spawn("splitserve.prefill_worker", "--model", str(long_model), "--dtype", "float32", "--cp-degree", "2")
    decode = WorkerStub(spawn("splitserve.decode_worker", "--model", str(long_model), "--dtype", "float32", "--transports", "grpc,torch",
                              "--lease-seconds", "2").address)
    (follower,) = children(group.popen.pid)
    os.kill(follower, signal.SIGSTOP)
    try:
        t, errors = under_way(group, decode, "cp-stuck", prompt, "torch")
        t.join(60)
        assert len(errors) == 1 and isinstance(errors[0], StatusError) and errors[0].status == "UNAVAILABLE", errors
        end, refusal = time.monotonic() + STALL_MIN_SECONDS + 30, None
        while refusal is None and time.monotonic() < end:
            start = time.monotonic()
            with pytest.raises(StatusError) as e:
                run_disaggregated(group.address, decode.address, f"cp-next-{start}", prompt[:100], GREEDY, transport="torch", timeout=30)
            assert e.value.status == "UNAVAILABLE", e.value
            if "broken" in str(e.value):
                refusal, took = e.value, time.monotonic() - start
        assert refusal is not None, "the group never said it was broken"
        assert "no progress for" in str(refusal) and "a rank stopped or hung" in str(refusal), refusal
        assert took < 2, took  # refused at once, not after waiting for its lease behind the stuck job
        assert reserved(decode) == 0
    finally:
        os.kill(follower, signal.SIGKILL)
        os.kill(follower, signal.SIGCONT)
