"""Each transport moves KV into exactly the reserved blocks, and refuses what it must.

Both ends run in this process (threads); the worker-process tests live in tests/e2e.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from splitserve.kv_transfer import torch_transport
from splitserve.kv_transfer.connect import connect
from splitserve.kv_transfer.errors import (
    HandshakeError,
    HandshakeRefusedError,
    PayloadError,
    PeerUnavailableError,
    TransferError,
    WrongSecretError,
)
from splitserve.kv_transfer.grpc_transport import (
    RAW_PUSH,
    GrpcSender,
    KVTransferServicer,
    add_kv_transfer_service,
)
from splitserve.kv_transfer.layout import FirstToken, KVLayout
from splitserve.kv_transfer.local import LocalHub
from splitserve.kv_transfer.receiver import KVReceiver, TensorKVStore
from splitserve.kv_transfer.sender import KVPusher
from splitserve.kv_transfer.state import TransferState, TransferTable
from splitserve.kv_transfer.torch_transport import TorchKVServer
from splitserve.kv_transfer.wire import PayloadHeader
from splitserve.proto import kv_pb2, kv_pb2_grpc
from splitserve.proto.server import WORKER_OPTIONS

LAYERS, BLOCKS, BS, KH, D = 3, 32, 4, 2, 8
LAYOUT = KVLayout("fp-1", "float32", BS, "L,NB,2,BS,KH,D", LAYERS, KH, D)
SECRET = "0f" * 16
FIRST = FirstToken(11, -1.5, ((11, -1.5), (3, -2.25)))  # the top logprobs travel with the commit


@dataclasses.dataclass
class Receiving:
    endpoint: str
    cache: torch.Tensor
    table: TransferTable
    done: list


@contextlib.contextmanager
def receiving(kind: str, layout: KVLayout = LAYOUT, blocks: int = BLOCKS) -> Iterator[tuple[str, Receiving, LocalHub]]:
    """(transport name, the receiving end, hub) for a cache of `blocks` blocks. "grpc" is a
    receiver with the raw-bytes Push method, "grpc-protobuf" one with only the .proto's Push
    (payload bytes inside protobuf messages), which gRPC senders fall back to; "torch-split" the
    torch transport with headers and payloads on two groups, as between GPUs (gloo for both here)."""
    cache = torch.zeros(layout.num_layers, blocks, *layout.block_shape)
    done: list = []
    table = TransferTable(layout.num_layers, done.append, commit_grace=0.5)
    receiver = KVReceiver("d0", layout, table, TensorKVStore(cache))
    hub = LocalHub()
    server = None
    if kind == "local":
        endpoint = hub.register(receiver)
    else:
        torch_server = TorchKVServer(receiver, "127.0.0.1") if kind.startswith("torch") else None
        server = grpc.server(futures.ThreadPoolExecutor(8), options=WORKER_OPTIONS)
        servicer = KVTransferServicer(receiver, torch_server.accept if torch_server else None)
        if kind == "grpc-protobuf":
            kv_pb2_grpc.add_KVTransferServicer_to_server(servicer, server)
        else:
            add_kv_transfer_service(servicer, server)
        endpoint = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
    try:
        yield kind.removesuffix("-protobuf").removesuffix("-split"), Receiving(endpoint, cache, table, done), hub
    finally:
        if server is not None:
            server.stop(0)


@pytest.fixture(params=["local", "grpc", "grpc-protobuf", "torch", "torch-split"])
def transport(request, monkeypatch) -> Iterator[tuple[str, Receiving, LocalHub]]:
    if request.param == "torch-split":
        monkeypatch.setattr(torch_transport, "SEPARATE_DATA", {"cpu", "cuda"})
    with receiving(request.param) as t:
        yield t


def send_request(pusher: KVPusher, rid: str, dst: list[int], kv: torch.Tensor, num_tokens: int, split: int = 2) -> None:
    """Push layer by layer in two chunks (the second re-sends the shared block, as chunked prefill does)."""
    for layer in range(LAYERS):
        pusher.push(rid, SECRET, layer, dst[:split], kv[layer, :split].clone())
        pusher.push(rid, SECRET, layer, dst[split - 1 :], kv[layer, split - 1 :].clone())
    pusher.commit(rid, SECRET, FIRST, num_tokens=num_tokens).result(timeout=30)


def test_kv_lands_in_the_reserved_blocks(transport) -> None:
    kind, rx, hub = transport
    pusher = KVPusher(connect(kind, rx.endpoint, "p0", LAYOUT, hub=hub), "d0")
    torch.manual_seed(0)
    cases = {"contiguous": [3, 4, 5, 6], "scattered": [20, 9, 17, 1]}
    sent = {}
    for rid, blocks in cases.items():
        rx.table.reserve(rid, blocks, num_tokens=15, lease_seconds=30, secret=SECRET)
        sent[rid] = torch.randn(LAYERS, len(blocks), 2, BS, KH, D)
        send_request(pusher, rid, blocks, sent[rid], 15)
    for rid, blocks in cases.items():
        t = rx.table.wait(rid, timeout=10)
        assert t.state is TransferState.COMPLETE, t.reason
        assert t.first == FIRST
        assert torch.equal(rx.cache[:, blocks], sent[rid])
    untouched = [b for b in range(BLOCKS) if b not in cases["contiguous"] + cases["scattered"]]
    assert rx.cache[:, untouched].abs().sum() == 0
    pusher.close()


@pytest.mark.parametrize("kind", ["grpc", "grpc-protobuf", "torch"])
def test_a_layer_of_many_blocks_lands_whole(kind) -> None:
    """A million-token prompt is 65,536 blocks a layer: however a transport splits such a layer
    (the torch transport's header holds at most 4,096 block ids), every block lands."""
    layout = dataclasses.replace(LAYOUT, num_layers=1, block_size=1, num_kv_heads=1, head_dim=1)
    blocks = 20_000
    with receiving(kind, layout, blocks) as (name, rx, hub):
        pusher = KVPusher(connect(name, rx.endpoint, "p0", layout, hub=hub), "d0")
        dst = list(range(blocks - 1, -1, -1))  # scattered: every payload goes through staging
        rx.table.reserve("long", dst, num_tokens=blocks, lease_seconds=30, secret=SECRET)
        kv = torch.randn(1, blocks, *layout.block_shape)
        pusher.push("long", SECRET, 0, dst, kv[0].clone())
        pusher.commit("long", SECRET, FIRST, num_tokens=blocks).result(timeout=30)
        assert rx.table.wait("long", timeout=10).state is TransferState.COMPLETE
        assert torch.equal(rx.cache[0, dst], kv[0])
        pusher.close()


@pytest.mark.parametrize("field, value", [
    ("model_fingerprint", "other-model"), ("dtype", "bfloat16"), ("block_size", 16), ("num_kv_heads", 4), ("protocol_version", 99),
])
def test_handshake_refuses_a_different_layout_naming_the_field(transport, field, value) -> None:
    kind, rx, hub = transport
    theirs = dataclasses.replace(LAYOUT, **{field: value})
    with pytest.raises((HandshakeError, HandshakeRefusedError)) as e:
        connect(kind, rx.endpoint, "p0", theirs, hub=hub)
    assert field in str(e.value)


def test_abort_fails_the_transfer_on_the_receiver(transport) -> None:
    kind, rx, hub = transport
    pusher = KVPusher(connect(kind, rx.endpoint, "p0", LAYOUT, hub=hub), "d0")
    rx.table.reserve("r", [1, 2], 8, 30, SECRET)
    pusher.push("r", SECRET, 0, [1, 2], torch.ones(2, 2, BS, KH, D))
    pusher.abort("r", SECRET, "prefill failed")
    t = rx.table.wait("r", timeout=10)
    assert t.state is TransferState.FAILED and "prefill failed" in t.reason
    assert len(rx.done) == 1
    pusher.close()


def test_touches_keep_a_reservation_past_its_lease_and_the_kv_lands_after(transport) -> None:
    """A queued request's sender touches its reservation every third of the lease: the receiver
    keeps it for three leases and more, then the KV comes and the transfer completes."""
    import time

    kind, rx, hub = transport
    pusher = KVPusher(connect(kind, rx.endpoint, "p0", LAYOUT, hub=hub), "d0")
    rx.table.reserve("queued", [3, 4, 5, 6], num_tokens=15, lease_seconds=0.6, secret=SECRET)
    rx.table.reserve("silent", [7], num_tokens=4, lease_seconds=0.6, secret=SECRET)
    end = time.monotonic() + 2
    while time.monotonic() < end:
        pusher.touch("queued", SECRET)
        time.sleep(0.2)
        rx.table.expire()  # as the decode worker's loop does between steps
    assert rx.table.get("silent").state is TransferState.EXPIRED
    assert rx.table.get("queued").state is TransferState.RESERVED
    kv = torch.randn(LAYERS, 4, 2, BS, KH, D)
    send_request(pusher, "queued", [3, 4, 5, 6], kv, 15)
    assert rx.table.wait("queued", timeout=10).state is TransferState.COMPLETE
    assert torch.equal(rx.cache[:, [3, 4, 5, 6]], kv)
    pusher.close()


def test_payload_for_unreserved_blocks_fails_the_request_not_the_connection(transport) -> None:
    kind, rx, hub = transport
    pusher = KVPusher(connect(kind, rx.endpoint, "p0", LAYOUT, hub=hub), "d0")
    rx.table.reserve("bad", [1, 2], 8, 30, SECRET)
    rx.table.reserve("good", [5], 4, 30, SECRET)
    pusher.push("bad", SECRET, 0, [1, 7], torch.ones(2, 2, BS, KH, D))
    with pytest.raises(TransferError):
        pusher.commit("bad", SECRET, FirstToken(1), 8).result(timeout=10)
    assert rx.table.get("bad").state is TransferState.FAILED and "not reserved" in rx.table.get("bad").reason
    kv = torch.randn(LAYERS, 1, 2, BS, KH, D)
    for layer in range(LAYERS):
        pusher.push("good", SECRET, layer, [5], kv[layer].clone())
    pusher.commit("good", SECRET, FirstToken(2), 4).result(timeout=10)
    assert rx.table.wait("good", 10).state is TransferState.COMPLETE
    pusher.close()


@pytest.mark.parametrize("transport", ["grpc"], indirect=True)  # hand-crafted wire messages
def test_truncated_grpc_payload_is_refused(transport) -> None:
    kind, rx, _ = transport
    rx.table.reserve("r", [1], 4, 30, SECRET)
    header = PayloadHeader.for_tensor("r", SECRET, 0, [1], torch.ones(1, 2, BS, KH, D))
    payload = kv_pb2.KVPayload(request_id="r", secret=SECRET, layer=0, block_ids=[1], dtype="float32", shape=header.shape,
                               byte_length=header.byte_length, data=b"\0" * (header.byte_length - 10))
    with grpc.insecure_channel(rx.endpoint) as ch:
        with pytest.raises(grpc.RpcError) as e:
            kv_pb2_grpc.KVTransferStub(ch).Push(iter([kv_pb2.KVMessage(payload=payload)]), timeout=10)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "truncated" in e.value.details()
    t = rx.table.get("r")
    assert t.state is TransferState.FAILED and "truncated" in t.reason and rx.done == [t]


@pytest.mark.parametrize("transport", ["grpc", "grpc-protobuf"], indirect=True)
def test_grpc_sender_uses_raw_bytes_where_the_receiver_serves_them(transport, request) -> None:
    _, rx, _ = transport
    sender = connect("grpc", rx.endpoint, "p0", LAYOUT)
    assert isinstance(sender, GrpcSender)
    assert sender.raw is (request.node.callspec.params["transport"] == "grpc")
    sender.close()


@pytest.mark.parametrize("transport", ["grpc"], indirect=True)  # hand-crafted wire messages
def test_raw_stream_payload_must_be_whole_and_follow_its_header(transport) -> None:
    _, rx, _ = transport
    header = PayloadHeader.for_tensor("r", SECRET, 0, [1], torch.ones(1, 2, BS, KH, D))

    def control(rid: str, secret: str = SECRET) -> bytes:
        payload = kv_pb2.KVPayload(request_id=rid, secret=secret, layer=0, block_ids=[1], dtype="float32", shape=header.shape,
                                   byte_length=header.byte_length)
        return kv_pb2.KVMessage(payload=payload).SerializeToString()

    short = b"\0" * (header.byte_length - 10)
    cases = (("r1", [control("r1"), short], "INVALID_ARGUMENT", "truncated", TransferState.FAILED),
             ("r2", [control("r2")], "INVALID_ARGUMENT", "ended between", TransferState.FAILED),
             ("r3", [b"\xff\xff not a message"], "INVALID_ARGUMENT", "malformed", TransferState.RESERVED),
             # a stranger's broken stream is refused for its secret and leaves the reservation alone
             ("r4", [control("r4", "00" * 16)], "PERMISSION_DENIED", "secret", TransferState.RESERVED),
             ("r5", [control("r5", "00" * 16), short], "PERMISSION_DENIED", "secret", TransferState.RESERVED))
    for rid, frames, code, why, state in cases:
        rx.table.reserve(rid, [1], 4, 30, SECRET)
        with grpc.insecure_channel(rx.endpoint) as ch, pytest.raises(grpc.RpcError) as e:
            ch.stream_unary(RAW_PUSH)(iter(frames), timeout=10)
        assert e.value.code() is getattr(grpc.StatusCode, code) and why in e.value.details(), (rid, e.value.details())
        assert rx.table.get(rid).state is state, rid


def test_header_size_mismatch_is_refused_before_any_write() -> None:
    table = TransferTable(LAYERS, lambda t: None)
    receiver = KVReceiver("x", LAYOUT, table, TensorKVStore(torch.zeros(LAYERS, BLOCKS, 2, BS, KH, D)))
    table.reserve("r", [1], 4, 30)
    bad = PayloadHeader("r", 0, (1,), "float32", (1, 2, BS, KH, D), 12)
    with pytest.raises(PayloadError, match="declares 12 bytes"):
        receiver.receive(bad, lambda dest: pytest.fail("must not write"))
    assert table.get("r").state is TransferState.FAILED


def test_a_sender_without_the_secret_is_refused_and_the_reservation_stays_intact(transport) -> None:
    """A peer with the cluster token but not this reservation's secret (another request's
    prefill, a stale retry, a confused client) can neither write, commit nor abort it; the
    rightful sender then completes it."""
    kind, rx, hub = transport
    intruder = KVPusher(connect(kind, rx.endpoint, "p1", LAYOUT, hub=hub), "d0")
    rx.table.reserve("r", [3, 4], 8, 30, SECRET)
    for layer in range(LAYERS):
        intruder.push("r", "f0" * 16, layer, [3, 4], torch.full((2, 2, BS, KH, D), 7.0))
    refused = intruder.commit("r", "f0" * 16, FirstToken(1), 8)
    with pytest.raises(TransferError) as e:
        refused.result(timeout=10)
    assert e.value.status == "PERMISSION_DENIED" and "secret" in str(e.value)
    intruder.abort("r", "", "spoil it")
    intruder.close()
    t = rx.table.get("r")
    assert t.state is TransferState.RESERVED and t.bytes_received == 0 and rx.done == []
    assert rx.cache.abs().sum() == 0
    rightful = KVPusher(connect(kind, rx.endpoint, "p0", LAYOUT, hub=hub), "d0")
    kv = torch.randn(LAYERS, 2, 2, BS, KH, D)
    send_request(rightful, "r", [3, 4], kv, 8, split=1)
    assert rx.table.wait("r", 10).state is TransferState.COMPLETE
    assert torch.equal(rx.cache[:, [3, 4]], kv)
    rightful.close()


def test_a_wrong_secret_refused_on_the_wire_directly() -> None:
    table = TransferTable(LAYERS, lambda t: None)
    receiver = KVReceiver("x", LAYOUT, table, TensorKVStore(torch.zeros(LAYERS, BLOCKS, 2, BS, KH, D)))
    table.reserve("r", [1], 4, 30, SECRET)
    header = PayloadHeader.for_tensor("r", "nope", 0, [1], torch.ones(1, 2, BS, KH, D))
    with pytest.raises(WrongSecretError):
        receiver.receive(header, lambda dest: pytest.fail("must not write"))
    with pytest.raises(WrongSecretError):
        receiver.abort("r", "nope", "x")
    receiver.abort("unknown", "nope", "x")  # nothing to abort: not an error
    assert table.get("r").state is TransferState.RESERVED


# Rounds of three 8 MiB buffers (KV messages), each written and freed, on a thread of its own
# as gRPC's are; prints the page faults of the last ten rounds. Run in a fresh process, since
# the setting is process-wide.
_FAULTS = """
import ctypes, resource, sys, threading
from splitserve.kv_transfer.grpc_transport import keep_freed_buffers
if sys.argv[1] == "1":
    assert keep_freed_buffers()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def rounds(n):
    for _ in range(n):
        bufs = [libc.malloc(8 << 20) for _ in range(3)]
        for b in bufs:
            ctypes.memset(b, 1, 8 << 20)
        for b in bufs:
            libc.free(b)
def run():
    rounds(2)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    rounds(10)
    print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=run)
t.start()
t.join()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_freed_kv_buffers_are_reused_not_faulted_in_again() -> None:
    """With glibc's defaults every freed multi-MiB buffer goes back to the OS and the next one
    faults in fresh zeroed pages (~30 % of a gRPC receiver's CPU); `keep_freed_buffers` keeps them."""
    faults = {on: int(subprocess.run([sys.executable, "-c", _FAULTS, on], capture_output=True, text=True, check=True, timeout=60).stdout)
              for on in ("0", "1")}
    assert faults["0"] > 10_000, faults  # ten rounds of 24 MiB, 61,440 pages: the defaults do fault
    assert faults["1"] < faults["0"] // 100, faults


# A torch-transport receiver in a process of its own, which the test stops (SIGSTOP) as a hung
# decode worker or a wedged host is: its kernel still acknowledges TCP, so gloo sees no error.
_RECEIVER = """
import sys, time
from splitserve.kv_transfer.layout import KVLayout
from tests.kv_transfer.test_transports import receiving
layout = KVLayout("fp-1", "float32", 16, "L,NB,2,BS,KH,D", 2, 8, 128)
with receiving("torch", layout, blocks=64) as (_, rx, _):
    print(rx.endpoint, flush=True)
    time.sleep(300)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX signals")
def test_a_hung_torch_receiver_breaks_the_pair_within_the_stall_timeout() -> None:
    """Without a bound the sender waited on gloo for PAIR_TIMEOUT (a day) and the prefill
    engine stalled behind its full push queue; now the pusher fails over."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        endpoint = proc.stdout.readline().strip()
        layout = KVLayout("fp-1", "float32", 16, "L,NB,2,BS,KH,D", 2, 8, 128)
        sender = torch_transport.TorchSender(endpoint, "p0", layout, stall_timeout=datetime.timedelta(seconds=1))
        pusher = KVPusher(sender, "d0")
        kv = torch.ones(64, *layout.block_shape)  # 8 MiB a payload
        pusher.push("r0", SECRET, 0, list(range(64)), kv)
        with pytest.raises(TransferError, match="refused") as e:  # nothing reserved; the pair works
            pusher.commit("r0", SECRET, FIRST, 16).result(timeout=30)
        assert not isinstance(e.value, PeerUnavailableError)
        os.kill(proc.pid, signal.SIGSTOP)
        for layer in range(32):  # far more than the sockets' buffers hold
            pusher.push("r1", SECRET, layer % 2, list(range(64)), kv)
        with pytest.raises(PeerUnavailableError, match="pair broke"):
            pusher.commit("r1", SECRET, FIRST, 16).result(timeout=30)
        assert pusher.broken is not None
    finally:
        proc.kill()
        proc.wait(10)
