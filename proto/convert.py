"""Generated messages <-> the core's dataclasses, in one place for every service.

Services call these at their edge and work with plain dataclasses inside.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.engine.sampling_params import SamplingParams
from splitserve.kv_transfer.layout import KVLayout, TransferDescriptor
from splitserve.proto import kv_pb2, worker_pb2


def params_to_proto(p: SamplingParams) -> worker_pb2.SamplingParams:
    msg = worker_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if not p.skip_special_tokens:
        msg.skip_special_tokens = False
    processors_to_proto(p, msg)
    return msg


def params_from_proto(msg: worker_pb2.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError naming the bad field."""
    return SamplingParams(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p,
        seed=msg.seed if msg.HasField("seed") else None, stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        skip_special_tokens=msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True,
        **processors_from_proto(msg),
    )


def processors_to_proto(p: SamplingParams, msg) -> None:
    """The logit processors' fields, which the public and the worker SamplingParams share."""
    msg.min_tokens, msg.top_logprobs = p.min_tokens, p.top_logprobs
    msg.frequency_penalty, msg.presence_penalty = p.frequency_penalty, p.presence_penalty
    if p.repetition_penalty != 1.0:
        msg.repetition_penalty = p.repetition_penalty
    msg.logit_bias.update(dict(p.logit_bias))


def processors_from_proto(msg) -> dict:
    return {
        "min_tokens": msg.min_tokens, "top_logprobs": msg.top_logprobs, "frequency_penalty": msg.frequency_penalty,
        "presence_penalty": msg.presence_penalty, "logit_bias": tuple(sorted(msg.logit_bias.items())),
        "repetition_penalty": msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
    }


def top_to_proto(top: Sequence[Sequence[tuple[int, float]]], cls) -> list:
    """Per token, its top logprobs as `cls` messages (worker_pb2.TopLogprobs or public_pb2's)."""
    return [cls(token_ids=[i for i, _ in t], logprobs=[lp for _, lp in t]) for t in top]


def top_from_proto(msgs) -> list[list[tuple[int, float]]]:
    return [list(zip(m.token_ids, m.logprobs)) for m in msgs]


def layout_to_proto(layout: KVLayout) -> kv_pb2.KVLayout:
    return kv_pb2.KVLayout(**layout.to_dict())


def layout_from_proto(msg: kv_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        model_fingerprint=msg.model_fingerprint, dtype=msg.dtype, block_size=msg.block_size, layout=msg.layout,
        num_layers=msg.num_layers, num_kv_heads=msg.num_kv_heads, head_dim=msg.head_dim, protocol_version=msg.protocol_version,
    )


def descriptor_to_proto(d: TransferDescriptor) -> worker_pb2.TransferDescriptor:
    return worker_pb2.TransferDescriptor(
        request_id=d.request_id, block_ids=list(d.block_ids), transport=d.transport, endpoint=d.endpoint,
        layout=layout_to_proto(d.layout), lease_expiry_unix=d.lease_expiry_unix, decode_worker_id=d.decode_worker_id,
        num_cached_blocks=d.num_cached_blocks, transfer_secret=d.secret,
    )


def descriptor_from_proto(msg: worker_pb2.TransferDescriptor) -> TransferDescriptor:
    return TransferDescriptor(
        request_id=msg.request_id, block_ids=tuple(msg.block_ids), transport=msg.transport, endpoint=msg.endpoint,
        layout=layout_from_proto(msg.layout), lease_expiry_unix=msg.lease_expiry_unix, decode_worker_id=msg.decode_worker_id,
        num_cached_blocks=msg.num_cached_blocks, secret=msg.transfer_secret,
    )


def stats_to_proto(worker_id: str, role: str, stats: dict[str, int], layout: KVLayout) -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(
        worker_id=worker_id, role=role, queued_prefill_tokens=stats["queued_prefill_tokens"],
        running_requests=stats["running"], waiting_requests=stats["waiting"], free_blocks=stats["free_blocks"],
        used_blocks=stats["used_blocks"], reserved_blocks=stats["reserved_blocks"], total_blocks=stats["total_blocks"],
        active_transfers=stats.get("active_transfers", 0), layout=layout_to_proto(layout),
        kv_bytes_received=stats.get("kv_bytes_received", 0),
    )
