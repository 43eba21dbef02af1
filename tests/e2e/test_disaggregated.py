"""Prefill worker -> decode worker processes, end to end: losslessness on every transport,
fan-in and fan-out. The reference is one engine serving the same prompts alone."""

from __future__ import annotations

import os
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from splitserve.decode_worker.service import DecodeService
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine import LLM, LLMEngine, SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.scheduler import SchedulerConfig
from splitserve.kv_transfer.grpc_transport import KVTransferServicer
from splitserve.kv_transfer.local import LocalHub
from splitserve.prefill_worker.service import PrefillService
from splitserve.prefill_worker.worker import PrefillWorker
from splitserve.proto import kv_pb2_grpc, worker_pb2_grpc
from splitserve.proto.server import start_server
from splitserve.router.legs import run_disaggregated
from tests.e2e.workers import WorkerStub

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
CHUNK = "64"  # chunked prefill on: prompts longer than this take several steps


def prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2000] + [rng.randint(2, 1999) for _ in range(n - 2)]
    return [[rng.randrange(3, 500) for _ in range(k)] for k in lengths]


@pytest.fixture(scope="module")
def expected(e2e_model: Path) -> dict[tuple[int, ...], list[int]]:
    llm = LLM(str(e2e_model), dtype="float32")
    ps = prompts()
    return {tuple(p): o.token_ids for p, o in zip(ps, llm.generate(ps, GREEDY))}


@pytest.fixture(scope="module")
def workers(e2e_model: Path, spawn):
    common = ["--model", str(e2e_model), "--dtype", "float32"]
    return {
        "p1": spawn("splitserve.prefill_worker", *common, "--max-prefill-chunk", CHUNK),
        "p2": spawn("splitserve.prefill_worker", *common, "--max-prefill-chunk", CHUNK),
        "d1": spawn("splitserve.decode_worker", *common, "--transports", "grpc,torch"),
        "d2": spawn("splitserve.decode_worker", *common, "--transports", "grpc,torch"),
    }


def run_all(pairs: list[tuple[str, str]], transport: str, expected: dict) -> None:
    ps = prompts()

    def one(i: int) -> tuple[list[int], list[int]]:
        p, d = pairs[i % len(pairs)]
        r = run_disaggregated(p, d, f"{transport}-{uuid.uuid4().hex[:8]}", ps[i], GREEDY, transport=transport, timeout=120)
        assert r.finish_reason == "length"
        return ps[i], r.token_ids

    with ThreadPoolExecutor(16) as pool:  # 16 requests in flight at once
        results = list(pool.map(one, range(len(ps))))
    mismatched = [len(p) for p, tokens in results if tokens != expected[tuple(p)]]
    assert not mismatched, f"prompts of these lengths diverged from the single engine: {mismatched}"


def assert_no_blocks_held(*addresses: str) -> None:
    for a in addresses:
        stats = WorkerStub(a).stats()
        assert stats.reserved_blocks == 0 and stats.active_transfers == 0 and stats.running_requests == 0


@pytest.mark.parametrize("transport", ["torch", "grpc"])
def test_parity_across_processes(workers, expected, transport: str) -> None:
    p1, d1 = workers["p1"].address, workers["d1"].address
    run_all([(p1, d1)], transport, expected)
    assert_no_blocks_held(d1)


# Every logit processor at once: penalties over prompt and output, a bias, min_tokens, seeded
# sampling and top logprobs. The prefill worker samples the first token, the decode worker
# the rest: what each reads (prompt, output so far, position) must be the same as in one engine.
PROCESSED = {
    "seeded": SamplingParams(temperature=0.8, seed=21, max_tokens=16, min_tokens=16, repetition_penalty=1.3, frequency_penalty=0.6,
                             presence_penalty=0.4, logit_bias={7: 3.0, 9: -100.0}, top_logprobs=4),
    "greedy": SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=-0.3, top_logprobs=2),
}


@pytest.mark.parametrize("transport", ["torch", "grpc"])
def test_logit_processors_and_top_logprobs_are_lossless_across_processes(workers, e2e_model: Path, transport: str) -> None:
    llm = LLM(str(e2e_model), dtype="float32")
    ps = prompts(6, seed=3)
    p1, d1 = workers["p2"].address, workers["d2"].address
    for name, params in PROCESSED.items():
        reference = llm.generate(ps, params)
        for prompt, ref in zip(ps, reference):
            r = run_disaggregated(p1, d1, f"proc-{uuid.uuid4().hex[:8]}", prompt, params, transport=transport, timeout=120)
            assert r.token_ids == ref.token_ids, f"{name}: a prompt of {len(prompt)} tokens diverged from the single engine"
            assert [[t for t, _ in top] for top in r.top_logprobs] == [[t for t, _ in top] for top in ref.top_logprobs]
            assert r.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
            assert all(len(top) == params.top_logprobs for top in r.top_logprobs)
    assert_no_blocks_held(d1)


def test_fan_in_two_prefill_workers_one_decode_worker(workers, expected) -> None:
    d1 = workers["d1"].address
    pairs = [(workers["p1"].address, d1), (workers["p2"].address, d1)]
    run_all(pairs, "torch", expected)
    assert_no_blocks_held(d1)


def test_fan_out_one_prefill_worker_two_decode_workers(workers, expected) -> None:
    p1 = workers["p1"].address
    d1, d2 = workers["d1"].address, workers["d2"].address
    run_all([(p1, d1), (p1, d2)], "grpc", expected)
    assert_no_blocks_held(d1, d2)


def test_parity_in_process(e2e_model: Path, expected) -> None:
    """Both workers in this process, KV over the in-process transport, calls over gRPC."""
    hub = LocalHub()

    def engine() -> LLMEngine:
        return LLMEngine(EngineConfig(model=str(e2e_model), dtype="float32", scheduler=SchedulerConfig(max_prefill_chunk=int(CHUNK))))

    prefill = PrefillWorker(engine(), "p-local", hub=hub)
    decode = DecodeWorker(engine(), "d-local", transports=("local",), default_transport="local", hub=hub)
    servers = []
    try:
        ps, pport, _ = start_server("127.0.0.1", 0, lambda s: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillService(prefill), s), [])
        ds, dport, _ = start_server(
            "127.0.0.1", 0,
            lambda s: (worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeService(decode), s),
                       kv_pb2_grpc.add_KVTransferServicer_to_server(KVTransferServicer(decode.receiver), s)),
            [],
        )
        servers = [ps, ds]
        p, d = f"127.0.0.1:{pport}", f"127.0.0.1:{dport}"
        run_all([(p, d)], "local", expected)
        assert_no_blocks_held(d)
    finally:
        for s in servers:
            s.stop(0)
        prefill.close()
        decode.close()


@pytest.mark.parametrize("transport", ["torch", "grpc"])
def test_conversation_moves_only_the_missing_kv(workers, e2e_model: Path, transport: str) -> None:
    """Turns of one conversation, with the prefix cached on both sides, on the decode side only
    and on the prefill side only: every turn equals the single engine, and a turn whose history
    the decode worker holds moves only its new tokens' KV."""
    single = LLM(str(e2e_model), dtype="float32")
    p1, p2, d1, d2 = (workers[k].address for k in ("p1", "p2", "d1", "d2"))
    rng = random.Random(transport)
    history: list[int] = []
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x block size x KV heads x head dim x float32
    for turn, (p, d, decode_has_history) in enumerate([(p1, d1, False), (p1, d1, True), (p2, d1, True), (p1, d2, False)]):
        prompt = history + [rng.randrange(3, 500) for _ in range(150)]
        before = WorkerStub(d).stats().kv_bytes_received
        r = run_disaggregated(p, d, f"conv-{transport}-{turn}-{uuid.uuid4().hex[:6]}", prompt, GREEDY, transport=transport, timeout=120)
        assert r.token_ids == single.generate([prompt], GREEDY)[0].token_ids, f"turn {turn} diverged"
        moved = WorkerStub(d).stats().kv_bytes_received - before
        all_blocks = -(-len(prompt) // 16)
        if decode_has_history:
            assert moved <= (all_blocks - (len(history) - 1) // 16) * block_bytes, (turn, moved)
        else:
            assert moved == all_blocks * block_bytes, (turn, moved)
        history = prompt + r.token_ids
    assert_no_blocks_held(d1, d2)


def test_workers_run_where_neither_ray_nor_redis_is_installed(e2e_model: Path, expected, tmp_path: Path) -> None:
    """GPU machines may have neither (benchmarks/gpu_suite.sh starts workers directly there): a
    worker outside any cluster, a CP group and the GPU suite's modules must not import them."""
    import subprocess
    import sys

    from tests.e2e.procs import ROOT, start

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("redis", "ray"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not installed here (blocked by the test)')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    imports = "import splitserve.prefill_worker.cp, benchmarks.gpu_sections, benchmarks.gpu_suite, benchmarks.kv_transfer"
    done = subprocess.run([sys.executable, "-c", imports], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    common = ["--model", str(e2e_model), "--dtype", "float32"]
    p = start("splitserve.prefill_worker", *common, "--cp-degree", "2", env=env)
    d = start("splitserve.decode_worker", *common, "--transports", "grpc,torch", env=env)
    try:
        prompt = prompts()[3]
        r = run_disaggregated(p.address, d.address, "no-ray-redis", prompt, GREEDY, transport="torch", timeout=120)
        assert r.token_ids == expected[tuple(prompt)]
    finally:
        p.stop()
        d.stop()
