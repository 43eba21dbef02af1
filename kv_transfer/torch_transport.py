"""torch.distributed point-to-point transport: gloo between CPU processes, NCCL between GPUs.

No global world: each (sender, receiver) pair gets its own two-rank process group, built on
first use through the receiver's TCPStore (the address and a fresh pair key come back from
the gRPC handshake) and reused for every later request, so pools can grow and shrink.

On the pair, messages go in order: a fixed-size JSON header and, for a payload, the KV bytes,
received straight into the reserved blocks when they are contiguous. A commit is answered with
an ack header carrying the receiver's verdict.

Between GPUs the headers go over a gloo group of their own (CPU) and only the payloads over
NCCL: the receiver waits for the next header between requests, for as long as the pair is idle,
and an NCCL receive waiting that long would hold up the GPU's stream behind it (everything the
decode engine runs there) and be ended by NCCL's watchdog. A payload's NCCL receive is posted
once its header has announced it, on a stream of the pair's own, and waited for before the
payload counts as landed. Left open: a sender that dies between a payload's header and its
bytes leaves that receive waiting until NCCL's watchdog ends it (PAYLOAD_TIMEOUT), and with it,
by NCCL's default error handling, the decode worker's process, which its controller restarts.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import secrets
import threading

import torch
import torch.distributed as dist

from splitserve.kv_transfer.errors import PeerUnavailableError, TransferError
from splitserve.kv_transfer.grpc_transport import handshake
from splitserve.kv_transfer.layout import FirstToken, KVLayout
from splitserve.kv_transfer.receiver import KVReceiver
from splitserve.kv_transfer.sender import KVSender
from splitserve.kv_transfer.wire import PayloadHeader
from splitserve.proto.server import CHANNEL_OPTIONS
from splitserve.proto.tls import TLSFiles, channel

logger = logging.getLogger(__name__)

SENDER, RECEIVER = 0, 1
# An idle pair waits in recv; a dead peer is noticed by its closed socket, not by this timeout.
PAIR_TIMEOUT = datetime.timedelta(hours=24)


PAYLOAD_TIMEOUT = datetime.timedelta(minutes=10)  # one NCCL payload, once announced
# A send, a commit's ack, or an announced payload's bytes that do not complete within this: the
# peer hangs. A stopped process or a wedged host still has its kernel acknowledge TCP, so gloo
# sees no error and would wait out PAIR_TIMEOUT, with the prefill engine blocked behind a full
# push queue; instead the pair is closed (gloo closes a pair whose wait timed out) and its
# requests fail over, as gRPC's keepalive does for that transport. Generous for one payload
# (TorchSender caps them at 1 GiB: ~9 s at 1 Gb/s).
STALL_TIMEOUT = datetime.timedelta(seconds=30)
SEPARATE_DATA = {"cuda"}  # device types whose payloads take a group of their own (see above)


def new_pair_groups(store: dist.Store, rank: int, device: torch.device) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(control, data) groups of a pair: one gloo group for both between CPUs."""
    ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl", store), rank, 2, PAIR_TIMEOUT)
    if device.type not in SEPARATE_DATA:
        return ctrl, ctrl
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = PAYLOAD_TIMEOUT
        return ctrl, dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, 2, opts)
    return ctrl, dist.ProcessGroupGloo(dist.PrefixStore("data", store), rank, 2, PAIR_TIMEOUT)


HEADER_BYTES = 64 << 10  # one fixed-size header message per payload: no length round trip


class _Pair:
    """One end of a pair's ordered message channel. Each message is a fixed-size JSON header,
    then (for a payload) the KV bytes. Sends are posted without waiting, up to two payloads
    ahead, so gloo's per-message handshake overlaps the previous payload's bytes."""

    IN_FLIGHT = 4  # sends (a header and its payload are two)

    def __init__(self, groups: tuple[dist.ProcessGroup, dist.ProcessGroup], peer: int, device: torch.device,
                 stall_timeout: datetime.timedelta = STALL_TIMEOUT) -> None:
        (self.ctrl, self.data), self.peer, self.device = groups, peer, device
        self.stall_timeout = stall_timeout
        self._in_flight: list[tuple[object, torch.Tensor, dist.ProcessGroup]] = []  # (work, tensor kept alive, its group)
        self._next_header: tuple[object, torch.Tensor] | None = None  # a header receive already posted
        # payloads received on a stream of their own, off the engine's (CUDA only)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def send_header(self, header: dict) -> None:
        data = json.dumps(header).encode()
        if len(data) > HEADER_BYTES:
            raise ValueError(f"KV header of {len(data)} bytes exceeds {HEADER_BYTES}")
        # padded in Python: torch.zeros of 64 KiB is an OpenMP region, waking (and spinning) its threads
        self._post(self.ctrl, torch.frombuffer(bytearray(data.ljust(HEADER_BYTES, b"\0")), dtype=torch.uint8))

    def recv_header(self, timeout: datetime.timedelta = PAIR_TIMEOUT) -> dict:
        """The next header; an idle pair waits for one up to PAIR_TIMEOUT."""
        work, buf = self._next_header or self._post_header_recv()
        self._next_header = None
        work.wait(timeout)
        raw = bytes(buf.numpy())
        return json.loads(raw[: raw.index(0) if 0 in raw else len(raw)].decode())

    def _post_header_recv(self) -> tuple[object, torch.Tensor]:
        buf = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        return self.ctrl.recv([buf], self.peer, 0), buf

    def post(self, t: torch.Tensor) -> None:
        """Queue a payload's send; returns once all but the newest IN_FLIGHT sends are done."""
        self._post(self.data, t.contiguous().to(self.device))

    def _post(self, group: dist.ProcessGroup, t: torch.Tensor) -> None:
        work = group.send([t.view(torch.uint8).view(-1)], self.peer, 0)
        self._in_flight.append((work, t, group))
        while len(self._in_flight) > self.IN_FLIGHT:
            self._wait_oldest()

    def flush(self) -> None:
        while self._in_flight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        work, _, group = self._in_flight.pop(0)
        self._wait(work, group)

    def _wait(self, work, group: dist.ProcessGroup) -> None:
        """Wait for a gloo send at most the stall timeout; an NCCL one only makes the current
        stream wait (a timeout would block this thread until the GPU is done), and NCCL's
        watchdog ends a hung one after PAYLOAD_TIMEOUT."""
        if isinstance(group, dist.ProcessGroupGloo):
            work.wait(self.stall_timeout)
        else:
            work.wait()

    def recv_bytes(self, t: torch.Tensor) -> None:
        """Receive a payload into `t`; the next header's receive is posted behind it, so that
        header lands while the payload's bytes stream (every payload is followed by one)."""
        if not t.is_contiguous():
            raise ValueError("receive buffer must be contiguous")
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # what was written into `t` before lands first
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            work = self.data.recv([t.view(torch.uint8).view(-1)], self.peer, 0)
            self._next_header = self._post_header_recv()
            self._wait(work, self.data)  # gloo: until the bytes are in; NCCL: makes the pair's stream wait, not this thread
        if self._stream is not None:
            self._stream.synchronize()


class TorchKVServer:
    """Receiver side: a TCPStore for rendezvous and one receiving thread per sender pair."""

    def __init__(self, receiver: KVReceiver, host: str, device: str = "cpu") -> None:
        self.receiver = receiver
        self.host = host
        self.device = torch.device(device)
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        self.address = f"{host}:{self.store.port}"
        self._threads: list[threading.Thread] = []

    def accept(self, sender_id: str) -> tuple[str, str]:
        """Start serving a new pair for `sender_id`; returns (store address, pair key).

        The rendezvous store itself takes any connection (TCPStore has no authentication), so
        the pair's keys live under a 128-bit random prefix that only this call hands out, over
        the KV handshake that needs the cluster token: a peer without the token cannot find
        the pair's rendezvous keys, join its group, or learn where its data connections are."""
        pair_key = f"kv/{sender_id}/{secrets.token_hex(16)}"
        t = threading.Thread(target=self._serve_pair, args=(pair_key,), name=f"kv-recv-{sender_id}", daemon=True)
        t.start()
        self._threads.append(t)
        return self.address, pair_key

    def _serve_pair(self, pair_key: str) -> None:
        seen: set[str] = set()
        try:
            pair = _Pair(new_pair_groups(dist.PrefixStore(pair_key, self.store), RECEIVER, self.device), SENDER, self.device)
            while (header := pair.recv_header())["kind"] != "close":
                self._handle(pair, header, seen)
        except Exception as e:  # the sender died or the pair broke: fail what it was sending
            reason = f"KV sender lost: {str(e).splitlines()[0][:200]}"
            logger.warning("pair %s: %s", pair_key, reason)
            for rid in seen:
                self.receiver.table.fail(rid, reason, "UNAVAILABLE")

    def _handle(self, pair: _Pair, h: dict, seen: set[str]) -> None:
        rid = h["request_id"]
        if h["kind"] == "payload":
            header = PayloadHeader(rid, h["layer"], tuple(h["block_ids"]), h["dtype"], tuple(h["shape"]), h["byte_length"], h.get("secret", ""))
            consumed = False

            def fill(dest: torch.Tensor) -> None:
                nonlocal consumed
                consumed = True
                pair.recv_bytes(dest)

            try:
                self.receiver.receive(header, fill)
                seen.add(rid)  # only once the secret was right
            except TransferError as e:
                logger.info("refused KV payload for %s: %s", rid, e)
            finally:
                if not consumed:  # keep the channel in step: drain the refused bytes
                    pair.recv_bytes(torch.empty(h["byte_length"], dtype=torch.uint8, device=self.device))
        elif h["kind"] == "commit":
            ack = {"kind": "ack", "request_id": rid, "ok": True, "reason": "", "status": ""}
            try:
                self.receiver.commit(rid, h.get("secret", ""), FirstToken.from_dict(h["first"]), h["num_tokens"])
            except TransferError as e:
                ack.update(ok=False, reason=str(e)[:1000], status=e.status)
            seen.discard(rid)
            pair.send_header(ack)  # the sender waits for the verdict, as with gRPC's stream result
            pair.flush()
        elif h["kind"] == "abort":
            try:
                self.receiver.abort(rid, h.get("secret", ""), h.get("reason", ""))
                seen.discard(rid)
            except TransferError as e:
                logger.info("refused KV abort for %s: %s", rid, e)
        elif h["kind"] == "touch":
            try:
                self.receiver.touch(rid, h.get("secret", ""))
            except TransferError as e:
                logger.info("refused KV touch for %s: %s", rid, e)


class TorchSender(KVSender):
    # gloo/NCCL have no message limit; the caps keep the header's block list within HEADER_BYTES
    # (4,096 ids of up to 10 digits in JSON: under 50 KB; a million-token prompt is 65,536 blocks)
    max_payload_bytes = 1 << 30
    max_payload_blocks = 4096
    def __init__(
        self, endpoint: str, sender_id: str, layout: KVLayout, device: str = "cpu", handshake_timeout: float = 10.0, token: str | None = None,
        tls: TLSFiles | None = None, stall_timeout: datetime.timedelta = STALL_TIMEOUT,
    ) -> None:
        with channel(endpoint, tls, CHANNEL_OPTIONS) as ch:  # the handshake (and the pair's secret) over the worker's gRPC port, TLS included
            reply = handshake(ch, sender_id, layout, "torch", handshake_timeout, token)
        host, port = reply.store_address.rsplit(":", 1)
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=handshake_timeout))
            groups = new_pair_groups(dist.PrefixStore(reply.pair_key, store), SENDER, torch.device(device))
        except (RuntimeError, dist.DistStoreError) as e:
            raise PeerUnavailableError(f"torch.distributed rendezvous at {reply.store_address} failed: {e}") from e
        self._store = store  # the pair's group needs the store alive
        self.pair = _Pair(groups, RECEIVER, torch.device(device), stall_timeout)

    def send(self, header: PayloadHeader, kv: torch.Tensor) -> None:
        meta = {"kind": "payload", "request_id": header.request_id, "layer": header.layer, "block_ids": list(header.block_ids),
                "dtype": header.dtype, "shape": list(header.shape), "byte_length": header.byte_length, "secret": header.secret}
        self._guarded(lambda: (self.pair.send_header(meta), self.pair.post(kv)))

    def commit(self, request_id: str, secret: str, first: FirstToken, num_tokens: int) -> None:
        meta = {"kind": "commit", "request_id": request_id, "secret": secret, "first": first.to_dict(), "num_tokens": num_tokens}
        self._guarded(lambda: (self.pair.send_header(meta), self.pair.flush()))
        ack: dict = {}
        self._guarded(lambda: ack.update(self.pair.recv_header(self.pair.stall_timeout)))
        if not ack.get("ok"):
            raise TransferError(f"KV transfer of {request_id} refused: {ack.get('reason')}", ack.get("status") or "INTERNAL")

    def finish(self, request_id: str) -> None:
        self._guarded(self.pair.flush)

    def abort(self, request_id: str, secret: str, reason: str) -> None:
        header = {"kind": "abort", "request_id": request_id, "secret": secret, "reason": reason}
        self._guarded(lambda: (self.pair.send_header(header), self.pair.flush()))

    def touch(self, request_id: str, secret: str) -> None:
        header = {"kind": "touch", "request_id": request_id, "secret": secret}
        self._guarded(lambda: (self.pair.send_header(header), self.pair.flush()))

    def close(self) -> None:
        try:
            self.pair.send_header({"kind": "close", "request_id": ""})
            self.pair.flush()
        except RuntimeError:
            pass

    @staticmethod
    def _guarded(fn) -> None:
        try:
            fn()
        except RuntimeError as e:
            raise PeerUnavailableError(f"torch.distributed KV pair broke: {str(e).splitlines()[0][:200]}") from e
