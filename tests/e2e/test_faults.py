"""Failures of one leg end the request with a definite error, in bounded time, and leave the
decode worker holding no reserved blocks."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest

from splitserve.engine import SamplingParams
from splitserve.proto import kv_pb2, worker_pb2
from splitserve.proto.convert import params_to_proto
from splitserve.proto.status import StatusError
from splitserve.router.legs import WorkerClient, run_disaggregated, stream_disaggregated
from tests.e2e.procs import wait_until
from tests.e2e.workers import WorkerStub

LONG = [3 + (i * 37) % 490 for i in range(3000)]


def stats(d: WorkerStub) -> worker_pb2.WorkerStats:
    return d.stats()


def assert_drained(d: WorkerStub, timeout: float = 10.0) -> None:
    wait_until(lambda: (s := stats(d)).reserved_blocks == 0 and s.active_transfers == 0 and s.running_requests == 0, timeout, "no blocks reserved")


@pytest.fixture(scope="module")
def common(e2e_model: Path) -> list[str]:
    return ["--model", str(e2e_model), "--dtype", "float32"]


@pytest.fixture(scope="module")
def decode(spawn, common) -> WorkerStub:
    return WorkerStub(spawn("splitserve.decode_worker", *common, "--transports", "grpc,torch").address)


@pytest.fixture(scope="module")
def prefill(spawn, common) -> WorkerStub:
    return WorkerStub(spawn("splitserve.prefill_worker", *common).address)


def reserve(d: WorkerStub, rid: str, prompt: list[int], lease: float = 0.0, max_tokens: int = 8) -> worker_pb2.TransferDescriptor:
    req = worker_pb2.ReserveRequest(request_id=rid, prompt_token_ids=prompt, params=params_to_proto(SamplingParams(max_tokens=max_tokens)), lease_seconds=lease)
    return d.decode.Reserve(req, timeout=10)


@pytest.mark.parametrize("transport", ["torch", "grpc"])
def test_prefill_process_killed_mid_transfer(spawn, common, decode: WorkerStub, transport: str) -> None:
    victim = spawn("splitserve.prefill_worker", *common, "--max-prefill-chunk", "16")  # ~190 steps for LONG
    before = stats(decode).kv_bytes_received
    errors: list[BaseException] = []

    def client() -> None:
        try:
            run_disaggregated(victim.address, decode.address, f"kill-{transport}", LONG, SamplingParams(max_tokens=4), transport=transport, timeout=60)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=client)
    start = time.monotonic()
    t.start()
    wait_until(lambda: stats(decode).kv_bytes_received > before, 30, "KV bytes arriving")
    victim.kill()
    t.join(30)
    assert not t.is_alive(), "the caller hung after the prefill worker died"
    assert len(errors) == 1 and isinstance(errors[0], StatusError), errors
    assert errors[0].status == "UNAVAILABLE"
    assert_drained(decode)
    assert time.monotonic() - start < 40


def test_lease_expires_without_prefill(decode: WorkerStub) -> None:
    reserve(decode, "orphan", [5] * 100, lease=1.0)
    assert stats(decode).reserved_blocks == 7
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(decode.decode.Decode(worker_pb2.DecodeRequest(request_id="orphan"), timeout=30))
    assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED and "lease expired" in e.value.details()
    assert time.monotonic() - start < 5
    assert_drained(decode)


def test_abort_during_decode(prefill: WorkerStub, decode: WorkerStub) -> None:
    async def run() -> None:
        p, d = WorkerClient(prefill.address), WorkerClient(decode.address)
        chunks = stream_disaggregated(p, d, "abort-me", [7] * 50, SamplingParams(max_tokens=3000, ignore_eos=True), timeout=60)
        first = await anext(chunks)
        assert first.token_ids
        await d.decode.Abort(worker_pb2.AbortRequest(request_id="abort-me", reason="test"), timeout=10)
        with pytest.raises(StatusError) as e:
            async for _ in chunks:
                pass
        assert e.value.status == "ABORTED"
        await p.close()
        await d.close()

    asyncio.run(run())
    assert_drained(decode)


def test_client_leaving_the_stream_aborts_the_request(prefill: WorkerStub, decode: WorkerStub) -> None:
    async def run() -> None:
        p, d = WorkerClient(prefill.address), WorkerClient(decode.address)
        chunks = stream_disaggregated(p, d, "walk-away", [9] * 40, SamplingParams(max_tokens=3000, ignore_eos=True), timeout=60)
        await anext(chunks)
        await chunks.aclose()  # closes the decode stream, which cancels it
        await asyncio.sleep(0.2)
        await p.close()
        await d.close()

    asyncio.run(run())
    assert_drained(decode)


@pytest.mark.parametrize("variant, field", [
    (["--block-size", "8"], "block_size"),
    (["--dtype", "bfloat16"], "dtype"),
    ("other-model", "model_fingerprint"),
])
def test_handshake_mismatch_is_refused_naming_the_field(spawn, common, make_checkpoint, prefill: WorkerStub, variant, field) -> None:
    if variant == "other-model":
        other = make_checkpoint(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, max_position_embeddings=4096, seed=99)
        args = ["--model", str(other), "--dtype", "float32"]
    else:
        args = [*common, *variant]
    d = WorkerStub(spawn("splitserve.decode_worker", *args).address)
    with pytest.raises(StatusError) as e:
        run_disaggregated(prefill.address, d.address, f"mismatch-{field}", [4] * 40, SamplingParams(max_tokens=4), timeout=30)
    assert e.value.status == "FAILED_PRECONDITION" and field in str(e.value)
    assert_drained(d)


def test_truncated_payload_fails_the_transfer_and_frees_the_blocks(decode: WorkerStub) -> None:
    d = reserve(decode, "trunc", [1] * 20)
    shape = [len(d.block_ids), 2, d.layout.block_size, d.layout.num_kv_heads, d.layout.head_dim]
    nbytes = 4 * shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
    payload = kv_pb2.KVPayload(request_id="trunc", secret=d.transfer_secret, layer=0, block_ids=d.block_ids, dtype="float32", shape=shape,
                               byte_length=nbytes, data=b"\0" * (nbytes // 2))
    with pytest.raises(grpc.RpcError) as e:
        decode.kv.Push(iter([kv_pb2.KVMessage(payload=payload)]), timeout=10)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "truncated" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(decode.decode.Decode(worker_pb2.DecodeRequest(request_id="trunc"), timeout=10))
    # a corrupt payload between two workers is an internal fault to the request's client
    assert e.value.code() is grpc.StatusCode.INTERNAL and "truncated" in e.value.details()
    assert_drained(decode)


def test_decode_of_an_unknown_request_is_not_found(decode: WorkerStub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        list(decode.decode.Decode(worker_pb2.DecodeRequest(request_id="never-reserved"), timeout=10))
    assert e.value.code() is grpc.StatusCode.NOT_FOUND
