"""Context-parallel prefill: a group of N ranks prefills one long prompt together.

Each rank holds a full model replica and two load-balanced chunks of the prompt. Embeddings,
norms, projections and the MLP are per token, so each rank runs them on its own tokens only;
attention crosses ranks through ring attention; RoPE uses global positions. After every layer
each rank pushes the KV of its own (whole) blocks straight to the decode worker and drops it,
so memory per rank grows with tokens / N and no rank keeps a KV cache. Rank 0 holds the last
chunk, so it computes the only logits needed (the last position), samples the first token and,
once every rank has delivered its KV, commits the transfer.

A request's journey: rank 0 takes it from the Prefill RPC -> broadcasts it to the group ->
all ranks run the layers (checking together, once a layer, whether to abort) -> every rank
flushes its pushes -> an all-reduce agrees everything went out -> rank 0 commits.
A rank that dies breaks the group: the request fails with UNAVAILABLE, its decode-side
reservation is aborted, and the group refuses work until it is restarted. So does a rank that
stops (its connections up, its collectives never answered): after STALL_LEASES leases with no
layer finished the group is marked broken.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import subprocess
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from splitserve.engine.config import LINEAR_KERNELS
from splitserve.engine.cpu_linear import use_linear_kernel
from splitserve.engine.loader import load_model
from splitserve.engine.model_runner import KV_LAYOUT
from splitserve.engine.sampler import SampleRow, sample
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv_transfer.errors import HandshakeError, PeerUnavailableError, request_status
from splitserve.kv_transfer.layout import FirstToken, KVLayout, TransferDescriptor
from splitserve.kv_transfer.wire import dtype_name
from splitserve.prefill_worker.pushers import LeaseKeeper, PusherPool, PushError
from splitserve.prefill_worker.ring_attention import (
    LinkModel,
    Ring,
    choose_variant,
    positions_of,
    ring_attention,
    shard_ranges,
)
from splitserve.proto.status import StatusError
from splitserve.proto.tls import TLSFiles, add_flags, from_flags, to_flags

logger = logging.getLogger(__name__)
GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # one operation of the group: joining, a ring step, an agreement
# Between jobs the followers wait in a broadcast on the control group, with this timeout of its
# own; rank 0 broadcasts a keep-alive when the group has been idle KEEPALIVE_SECONDS, so that wait
# never reaches it (a follower whose wait timed out would leave, and the group would be broken).
# The keep-alive also finds a rank that died while the group was idle (the group says it is
# broken and is replaced), so it is frequent: it costs one small broadcast.
IDLE_TIMEOUT = datetime.timedelta(hours=24)
KEEPALIVE_SECONDS = 30.0
KEEPALIVE = "{}"  # a job text no job has
# A job whose group finishes no layer for this many leases (at least STALL_MIN_SECONDS) has a rank
# that stopped (SIGSTOP, a hung GPU or host) while its connections stay up: the collectives would
# wait GROUP_TIMEOUT. Its reservation has long expired; the group is marked broken.
STALL_LEASES = 4
STALL_MIN_SECONDS = 20.0


def rank_device(device: str, rank: int, world: int, gpu_per_rank: bool, gpus: int | None = None) -> torch.device:
    """Where rank `rank` runs. A group whose ranks share a node's GPUs (followers started here,
    `gpu_per_rank`) needs one GPU per rank: NCCL refuses two ranks on one device, so "cuda" or
    "cuda:K" means GPU K + rank there. Ranks placed by Ray see only their own GPU: as given."""
    d = torch.device(device)
    if d.type != "cuda" or not gpu_per_rank or world == 1:
        return d
    gpus = torch.cuda.device_count() if gpus is None else gpus
    first = d.index or 0
    if first + world > gpus:
        raise ValueError(f"a context-parallel group of {world} ranks from {device!r} needs GPUs {first}..{first + world - 1}; this node has {gpus}")
    return torch.device("cuda", first + rank)


class CPError(StatusError):
    """A context-parallel prefill failed. `group_broken`: a rank is gone, the group must be
    restarted; `receiver_lost`: the decode worker the KV went to is gone (the group is fine)."""

    def __init__(self, status: str, message: str, *, group_broken: bool = False, receiver_lost: bool = False) -> None:
        super().__init__(status, message)
        self.group_broken, self.receiver_lost = group_broken, receiver_lost


@dataclass
class CPJob:
    request_id: str
    prompt: list[int]
    params: dict
    descriptor: dict
    variant: str = ""  # "" = choose from the cost model
    position: int = 0  # the output position of the token sampled (a continuation's prefix length)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def descriptor_to_dict(d: TransferDescriptor) -> dict:
    out = asdict(d)
    out["block_ids"] = list(d.block_ids)
    return out


def descriptor_from_dict(d: dict) -> TransferDescriptor:
    return TransferDescriptor(**{**d, "block_ids": tuple(d["block_ids"]), "layout": KVLayout(**d["layout"])})


class CPRank:
    """One rank of a CP group: a model replica, the group's ring, pushers to decode workers."""

    def __init__(self, model: str, *, rank: int, world: int, store: str, block_size: int, sender_id: str, dtype: str = "auto",
                 device: str = "cpu", token: str | None = None, mlp_chunk: int = 2048, link: LinkModel = LinkModel(),
                 tls: TLSFiles | None = None, linear_kernel: str = "torch", num_threads: int | None = None,
                 idle_timeout: datetime.timedelta = IDLE_TIMEOUT, gpu_per_rank: bool = False) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = rank_device(device, rank, world, gpu_per_rank)
        self.idle_timeout = idle_timeout
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model, config = load_model(model, dtype, str(self.device))
        if any(w is not None for w in config.sliding_windows):
            raise ValueError("context parallelism does not support sliding-window attention (this model uses it)")
        use_linear_kernel(self.model, linear_kernel, batch_hint=mlp_chunk)  # as the engines of the cluster do
        self.config = config
        self.rank, self.world, self.block_size = rank, world, block_size
        self.mlp_chunk, self.link = mlp_chunk, link
        self.dtype = next(self.model.parameters()).dtype
        self.layout = KVLayout(config.fingerprint, dtype_name(self.dtype), block_size, KV_LAYOUT, config.num_layers, config.num_kv_heads, config.head_dim)
        host, port = store.rsplit(":", 1)
        tcp = dist.TCPStore(host, int(port), world, rank == 0, timeout=GROUP_TIMEOUT, wait_for_workers=False)
        # Control (jobs, agreements) on CPU over gloo, always: the followers idle there, and an
        # idle NCCL operation would hold the GPU's stream and meet NCCL's watchdog.
        self.ctrl = dist.ProcessGroupGloo(dist.PrefixStore("cp-ctrl", tcp), rank, world, GROUP_TIMEOUT)
        if self.device.type == "cuda":  # the ring's K/V/Q between GPUs over NCCL, posted only inside a job
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = GROUP_TIMEOUT
            pg = dist.ProcessGroupNCCL(dist.PrefixStore("cp", tcp), rank, world, opts)
        else:
            pg = dist.ProcessGroupGloo(dist.PrefixStore("cp", tcp), rank, world, GROUP_TIMEOUT)
        self.ring = Ring(pg, rank, world, self.device)
        self._store = tcp
        self.pushers = PusherPool(f"{sender_id}-r{rank}", self.layout, device=str(self.device), token=token, tls=tls)
        self.abort_flag = False
        self.deadline = float("inf")
        self.layers_done = 0  # rank 0: the group's progress, which keeps queued requests' leases
        self.generator = torch.Generator(device=self.device).manual_seed(0)

    # ---- the group's control channel (rank 0 -> everyone) ---------------------------------
    def broadcast(self, text: str | None = None, wait: datetime.timedelta = GROUP_TIMEOUT, root: int = 0) -> str:
        """Rank `root` sends `text` to every rank; the others receive it, waiting up to `wait`."""
        n = torch.tensor([len(text.encode()) if text else 0], dtype=torch.int64)
        self._bcast(n, wait, root)
        if self.rank == root and text:
            data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
        else:
            data = torch.empty(int(n.item()), dtype=torch.uint8)
        if data.numel():
            self._bcast(data, GROUP_TIMEOUT, root)
        return bytes(data.numpy()).decode() if data.numel() else ""

    def _bcast(self, t: torch.Tensor, wait: datetime.timedelta, root: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.timeout = wait
        self.ctrl.broadcast([t], opts).wait()

    def _allreduce(self, value: int, op: dist.ReduceOp) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = op
        self.ctrl.allreduce([t], opts).wait()
        return int(t.item())

    def agree(self, flag: bool) -> bool:
        """True on every rank if any rank passed True (failure or abort is everyone's)."""
        return bool(self._allreduce(int(flag), dist.ReduceOp.MAX))

    def first_failure(self, status: str | None, message: str = "") -> tuple[str, str] | None:
        """None on every rank when every rank passed status None; else, on every rank, the
        status and message of the lowest rank that failed (its message prefixed "rank R: "),
        so that rank 0, which answers the request, says what the failing rank saw."""
        root = self._allreduce(self.world if status is None else self.rank, dist.ReduceOp.MIN)
        if root == self.world:
            return None
        status, message = json.loads(self.broadcast(json.dumps([status, message]) if self.rank == root else None, root=root))
        return status, f"rank {root}: {message}"

    def follow(self) -> None:
        """Ranks > 0: run every job rank 0 broadcasts, until it broadcasts the end."""
        while (text := self.broadcast(wait=self.idle_timeout)) != "":  # between jobs: rank 0's keep-alive comes first
            if text == KEEPALIVE:
                continue
            job = CPJob(**json.loads(text))
            try:
                self.run(job)
            except CPError as e:
                logger.warning("rank %d: %s", self.rank, e)

    # ---- one request ---------------------------------------------------------------------
    def run(self, job: CPJob) -> FirstToken | None:
        """Prefill the job's prompt with the group and push its KV; rank 0 returns the first
        token after committing the transfer."""
        desc = descriptor_from_dict(job.descriptor)
        n_tokens = len(job.prompt)
        ranges = shard_ranges(n_tokens, self.world, self.block_size)[self.rank]
        pos = positions_of(ranges).to(self.device)
        cfg = self.config
        variant = job.variant or choose_variant(n_tokens, 0, self.world, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.dtype.itemsize, self.link)
        pusher = None
        try:
            try:
                pusher, unreachable = self.pushers.get(desc), None
            except Exception as e:
                unreachable = e
            # every rank fails the request together (none is left waiting in a collective), with
            # the failing rank's reason: a misconfigured rank is named, not hidden behind rank 0
            failure = self.first_failure(unreachable and getattr(unreachable, "status", "UNAVAILABLE"), str(unreachable or ""))
            if failure is not None:
                lost = self.agree(isinstance(unreachable, PushError) and isinstance(unreachable.__cause__, PeerUnavailableError))
                raise CPError(*failure, receiver_lost=lost)
            first = self._forward(job, desc, ranges, pos, variant, pusher)
            undelivered = None
            try:
                pusher.flush(job.request_id).result(timeout=600)
            except Exception as e:
                logger.warning("rank %d: pushing KV of %s failed: %s", self.rank, job.request_id, e)
                undelivered = e
            failure = self.first_failure(undelivered and "UNAVAILABLE", f"could not deliver its KV of {job.request_id}: {undelivered}")
            if failure is not None:  # the ranks still agree: the group is fine, the transfer is not
                lost = self.agree(isinstance(undelivered, PeerUnavailableError))  # the decode worker is gone (its leg failed), or it refused the KV
                raise CPError(*failure, receiver_lost=lost)
            if self.rank == 0:
                try:
                    pusher.commit(job.request_id, desc.secret, first, n_tokens).result(timeout=600)
                except Exception as e:  # the decode side refused or lost it: the request fails, the group is fine
                    raise CPError(request_status(e), f"KV transfer of {job.request_id} failed: {e}",
                                  receiver_lost=isinstance(e, PeerUnavailableError)) from e
                return first
            return None
        except CPError:
            if pusher is not None:
                pusher.abort(job.request_id, desc.secret, "context-parallel prefill failed")
            raise
        except Exception as e:  # a gloo error: a rank died; the group is broken
            if pusher is not None:
                pusher.abort(job.request_id, desc.secret, "context-parallel prefill failed")
            raise CPError("UNAVAILABLE", f"context-parallel group failed during {job.request_id}: {str(e).splitlines()[0][:200]}",
                          group_broken=True) from e

    @torch.inference_mode()
    def _forward(self, job: CPJob, desc: TransferDescriptor, ranges, pos: torch.Tensor, variant: str, pusher) -> FirstToken | None:
        m = self.model.model
        h = m.embed_tokens(torch.tensor(job.prompt, device=self.device)[pos])  # [t, hidden], this rank's tokens only
        scale = self.config.head_dim ** -0.5
        rope = m.rotary_emb(pos, h.dtype)
        for i, layer in enumerate(m.layers):
            # once a layer the ranks stop together: an abort, the deadline, or a rank whose KV
            # could not be delivered (the decode side refused it or is gone: no use computing on)
            failure = self.first_failure(*self._stop_reason(job.request_id, pusher))
            if failure is not None:
                undelivered = pusher.failure(job.request_id)
                raise CPError(*failure, receiver_lost=self.agree(isinstance(undelivered, PeerUnavailableError)))
            q, k, v = layer.self_attn.project(layer.input_layernorm(h), rope)
            out, _ = ring_attention(self.ring, q, k, v, pos, pos, scale, variant)  # [t, H, D] float32
            h = h + layer.self_attn.o_proj(out.to(h.dtype).flatten(1))
            h = h + layer.mlp(layer.post_attention_layernorm(h), self.mlp_chunk)
            self._push(pusher, job.request_id, desc, i, ranges, k, v)
            self.layers_done += 1
        if self.rank != 0:
            return None
        last = int((pos == len(job.prompt) - 1).nonzero()[0, 0])  # rank 0 holds the last chunk
        logits = self.model.lm_head(m.norm(h[last : last + 1])).float()
        n_prompt = len(job.prompt) - job.position  # the rest is a continuation's output prefix
        row = SampleRow.of(SamplingParams(**job.params), job.prompt[:n_prompt], job.prompt[n_prompt:], self.config.eos_token_ids)
        s = sample(logits, [row], self.generator)
        return FirstToken(s.tokens[0], s.logprobs[0], tuple(s.top_logprobs[0]))

    def _stop_reason(self, request_id: str, pusher) -> tuple[str | None, str]:
        if self.abort_flag:
            return "ABORTED", f"prefill of {request_id} aborted"
        if time.monotonic() > self.deadline:
            return "DEADLINE_EXCEEDED", f"prefill of {request_id} passed its deadline"
        if (undelivered := pusher.failure(request_id)) is not None:
            return request_status(undelivered), f"could not deliver its KV of {request_id}: {undelivered}"
        return None, ""

    def _push(self, pusher, rid: str, desc: TransferDescriptor, layer: int, ranges, k: torch.Tensor, v: torch.Tensor) -> None:
        """Ship this rank's blocks of one layer ([n, 2, bs, KH, D]) and let them go."""
        bs, row, skip = self.block_size, 0, desc.num_cached_blocks
        for a, b in ranges:
            if a == b:
                continue
            n = -(-(b - a) // bs)
            kv = torch.zeros(2, n * bs, *k.shape[1:], dtype=k.dtype, device=k.device)
            kv[0, : b - a] = k[row : row + b - a]
            kv[1, : b - a] = v[row : row + b - a]
            kv = kv.view(2, n, bs, *k.shape[1:]).transpose(0, 1)  # [n, 2, bs, KH, D]
            first = max(0, skip - a // bs)  # blocks the decode side already holds are not sent
            if first < n:
                pusher.push(rid, desc.secret, layer, list(desc.block_ids[a // bs + first : a // bs + n]), kv[first:].contiguous())
            row += b - a

    def close(self) -> None:
        self.pushers.close()


class CPPrefillWorker:
    """Rank 0's face to the prefill service: the same calls as `PrefillWorker`, one request
    at a time through the group."""

    def __init__(self, rank0: CPRank, worker_id: str, followers: list | None = None, keepalive_s: float = KEEPALIVE_SECONDS) -> None:
        self.rank0 = rank0
        self.worker_id = worker_id
        self.layout = rank0.layout
        self.followers = followers or []
        self.accepting = True
        self.broken: str | None = None
        self._turn = threading.Lock()
        self._waiting: dict[str, int] = {}
        self._aborted: dict[str, str] = {}  # queued requests aborted before their turn: why
        self._current: str | None = None
        self._closed = threading.Event()
        self._stall_s = STALL_MIN_SECONDS  # the current job's (see STALL_LEASES)
        threading.Thread(target=self._keep_alive, args=(keepalive_s,), name=f"cp-keepalive-{worker_id}", daemon=True).start()
        threading.Thread(target=self._watch, name=f"cp-watch-{worker_id}", daemon=True).start()

    def _keep_alive(self, every: float) -> None:
        """While the group is idle, tell the followers so now and then (see KEEPALIVE_SECONDS)."""
        while not self._closed.wait(every):
            if self.broken or not self._turn.acquire(blocking=False):
                continue  # a job is running: that is news enough
            try:
                if not self._closed.is_set():
                    self.rank0.broadcast(KEEPALIVE)
            except Exception as e:  # a gloo error: a rank is gone; the next request says so at once
                self.broken = f"lost a rank while idle: {str(e).splitlines()[0][:200]}"
                logger.warning("context-parallel group %s %s", self.worker_id, self.broken)
            finally:
                self._turn.release()

    def _watch(self) -> None:
        """Mark the group broken when its job stops making progress (see STALL_LEASES): new
        requests are refused at once instead of queueing behind it, and the controller replaces
        the group (the stuck collective itself ends only when the rank dies or GROUP_TIMEOUT)."""
        seen, since = None, time.monotonic()
        while not self._closed.wait(0.5):
            progress = (self._current, self.rank0.layers_done)
            if progress[0] is None or progress != seen:
                seen, since = progress, time.monotonic()
            elif not self.broken and time.monotonic() - since > self._stall_s:
                self.broken = f"no progress for {time.monotonic() - since:.0f} s in the prefill of {progress[0]} (a rank stopped or hung)"
                self.rank0.abort_flag = True
                logger.warning("context-parallel group %s: %s", self.worker_id, self.broken)

    def prefill(self, request_id: str, prompt: list[int], params: SamplingParams, descriptor: TransferDescriptor, timeout: float,
                output_prefix: list[int] = ()):
        from splitserve.prefill_worker.worker import PrefillError, PrefillResult, check_descriptor

        if not self.accepting:
            raise PrefillError("UNAVAILABLE", f"prefill group {self.worker_id} is draining")
        try:
            descriptor.layout.check_peer(self.layout)  # the decode side receives, this side sends
        except HandshakeError as e:
            raise PrefillError(e.status, f"decode worker {descriptor.decode_worker_id}: {e}") from e
        prompt, position = list(prompt) + list(output_prefix), len(output_prefix)  # a continuation's KV is computed with its prompt's
        check_descriptor(descriptor, len(prompt), self.layout.block_size)
        arrival = time.monotonic()
        self._wait_turn(request_id, descriptor, len(prompt), timeout)
        try:
            if self.broken:
                raise self._broken_error()
            start = time.monotonic()
            self.rank0.deadline = arrival + timeout
            job = CPJob(request_id, list(prompt), asdict(params), descriptor_to_dict(descriptor), position=position)
            try:
                try:
                    self.rank0.broadcast(job.to_json())
                except Exception as e:  # a gloo error: a rank is gone, the group with it
                    raise CPError("UNAVAILABLE", f"context-parallel group {self.worker_id} lost a rank: {str(e).splitlines()[0][:200]}",
                                  group_broken=True) from e
                first = self.rank0.run(job)
            except CPError as e:
                if e.group_broken:
                    self.broken = str(e)
                raise PrefillError(e.status, str(e), receiver_lost=e.receiver_lost) from e
            return PrefillResult(request_id, first, 0, start - arrival, time.monotonic() - start)
        finally:
            self._current = None
            self._turn.release()

    def _wait_turn(self, request_id: str, descriptor: TransferDescriptor, n_tokens: int, timeout: float) -> None:
        """Wait for the group, one request at a time. Meanwhile an abort ends the wait at once,
        and the decode worker is told the KV is still coming while the group makes progress."""
        from splitserve.prefill_worker.worker import PrefillError

        end = time.monotonic() + timeout
        stall_s = max(STALL_MIN_SECONDS, STALL_LEASES * (descriptor.lease_expiry_unix - time.time()))  # (by the decode host's clock)
        self._waiting[request_id] = n_tokens
        keeper = None
        try:
            while not self._turn.acquire(timeout=max(0.0, min(0.2, end - time.monotonic()))):
                if self.broken:  # behind a job that will not end
                    raise self._broken_error()
                if request_id in self._aborted:
                    raise PrefillError("ABORTED", f"prefill of {request_id!r} aborted while queued: {self._aborted[request_id]}")
                if time.monotonic() >= end:
                    raise PrefillError("DEADLINE_EXCEEDED", f"prefill of {request_id!r} waited {timeout:g} s for the group")
                if keeper is None:
                    try:
                        keeper = LeaseKeeper(self.rank0.pushers.get(descriptor), request_id, descriptor, lambda: self.rank0.layers_done)
                    except PushError as e:  # no use waiting for a decode worker that cannot be reached
                        raise PrefillError(e.status, str(e), receiver_lost=isinstance(e.__cause__, PeerUnavailableError)) from e
                keeper.tick()
            if request_id in self._aborted:  # aborted as its turn came
                self._turn.release()
                raise PrefillError("ABORTED", f"prefill of {request_id!r} aborted while queued: {self._aborted[request_id]}")
            # (before it leaves the queue: an abort finds it in one or the other)
            self._stall_s, self._current, self.rank0.abort_flag = stall_s, request_id, False
        except PrefillError:
            if keeper is not None and keeper.touches:  # the receiver knows of it: say it ends
                keeper.pusher.abort(request_id, descriptor.secret, "prefill aborted while queued")
            raise
        finally:
            self._waiting.pop(request_id, None)
            self._aborted.pop(request_id, None)

    def _broken_error(self):
        from splitserve.prefill_worker.worker import PrefillError

        return PrefillError("UNAVAILABLE", f"context-parallel group {self.worker_id} is broken ({self.broken}); it must be restarted")

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        if self._current == request_id:
            self.rank0.abort_flag = True
            return True
        if request_id in self._waiting:
            self._aborted[request_id] = reason
            return True
        return False

    def kv_events(self, snapshot: bool) -> tuple[list, list[int] | None]:
        """A CP group keeps no KV cache: it never holds a prefix."""
        return [], ([] if snapshot else None)

    def stats(self) -> dict[str, int]:
        busy = self._current is not None
        return {"running": int(busy), "waiting": len(self._waiting), "queued_prefill_tokens": sum(self._waiting.values()),
                "free_blocks": 0, "used_blocks": 0, "reserved_blocks": 0, "total_blocks": 0, "cached_blocks": 0}

    def close(self) -> None:
        self._closed.set()
        turn = self._turn.acquire(timeout=5)  # not in the middle of a keep-alive or a job
        if not turn:  # a job is running: it aborts at its next layer
            self.rank0.abort_flag = True
            turn = self._turn.acquire(timeout=60)
        if turn and not self.broken:  # (otherwise the followers' collectives would not match: they are ended below)
            try:
                self.rank0.broadcast("")  # followers leave their loop
            except Exception as e:
                logger.debug("closing the group: %s", e)
        if turn:
            self._turn.release()
        for p in self.followers:  # told to leave, they exit by themselves; one that does not is ended
            try:
                p.wait(10 if turn and not self.broken else 0)
            except subprocess.TimeoutExpired:
                p.terminate()
        self.rank0.close()


def start_group(model: str, *, world: int, block_size: int, worker_id: str, dtype: str = "auto", device: str = "cpu",
                token: str | None = None, host: str = "127.0.0.1", publish_store=None, tls: TLSFiles | None = None,
                linear_kernel: str = "torch", num_threads: int | None = None, idle_timeout: datetime.timedelta = IDLE_TIMEOUT,
                keepalive_s: float = KEEPALIVE_SECONDS) -> CPPrefillWorker:
    """Become rank 0 of a group and return its prefill worker once all ranks have joined.
    Ranks 1..N-1 are started here as child processes, unless `publish_store(address)` is
    given: then they are started elsewhere (Ray actors in the group's placement group) and
    find the rendezvous address where `publish_store` put it."""
    import sys

    from splitserve.cluster.net import free_port

    store = f"{host}:{free_port(host)}"
    common = ["--model", model, "--store", store, "--world", str(world), "--block-size", str(block_size), "--dtype", dtype, "--device", device,
              "--sender-id", worker_id, "--linear-kernel", linear_kernel, "--idle-timeout-s", str(idle_timeout.total_seconds()), "--gpu-per-rank"]
    common += (["--num-threads", str(num_threads)] if num_threads is not None else []) + (["--token", token] if token else []) + to_flags(tls)
    followers = []
    if publish_store is not None:
        publish_store(store)
    else:
        followers = [subprocess.Popen([sys.executable, "-m", "splitserve.prefill_worker.cp", "--rank", str(r), *common]) for r in range(1, world)]
    try:
        rank0 = CPRank(model, rank=0, world=world, store=store, block_size=block_size, sender_id=worker_id, dtype=dtype, device=device, token=token,
                       tls=tls, linear_kernel=linear_kernel, num_threads=num_threads, idle_timeout=idle_timeout,
                       gpu_per_rank=publish_store is None)  # placed by Ray, each rank sees its own GPU
    except BaseException:
        for p in followers:
            p.kill()
        raise
    return CPPrefillWorker(rank0, worker_id, followers, keepalive_s)


def follower_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m splitserve.prefill_worker.cp")
    for flag in ("--model", "--store", "--sender-id"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--token", default=None)
    parser.add_argument("--linear-kernel", choices=LINEAR_KERNELS, default="torch")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--idle-timeout-s", type=float, default=IDLE_TIMEOUT.total_seconds(), help=argparse.SUPPRESS)  # rank 0's
    parser.add_argument("--gpu-per-rank", action="store_true", help=argparse.SUPPRESS)  # started by rank 0 on its node
    add_flags(parser)
    return parser


def follower_rank_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """CPRank's arguments from a follower's command line."""
    return dict(model=args.model, rank=args.rank, world=args.world, store=args.store, block_size=args.block_size, sender_id=args.sender_id,
                dtype=args.dtype, device=args.device, token=args.token, tls=from_flags(parser, args), linear_kernel=args.linear_kernel,
                num_threads=args.num_threads, idle_timeout=datetime.timedelta(seconds=args.idle_timeout_s), gpu_per_rank=args.gpu_per_rank)


def follower_main(argv: list[str] | None = None) -> None:
    """`python -m splitserve.prefill_worker.cp --rank R --world N --store HOST:PORT --model DIR ...`"""
    parser = follower_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s cp-rank{args.rank} %(levelname)s %(name)s: %(message)s")
    rank = CPRank(**follower_rank_args(parser, args))
    try:
        rank.follow()
    except RuntimeError as e:  # a gloo error between jobs: rank 0 (or another rank) is gone, and the group with it
        logger.warning("rank %d leaves: the group broke (%s)", args.rank, str(e).splitlines()[0][:300])
        raise SystemExit(1) from None
    finally:
        rank.close()


if __name__ == "__main__":
    follower_main()
