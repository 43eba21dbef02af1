"""The KV layout two workers must share to exchange blocks, and the handshake check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from splitserve.kv_transfer.errors import HandshakeError

PROTOCOL_VERSION = 2  # 2: the torch transport's pair groups moved under ctrl/ and data/ in the rendezvous store


@dataclass(frozen=True)
class KVLayout:
    model_fingerprint: str
    dtype: str
    block_size: int
    layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    protocol_version: int = PROTOCOL_VERSION

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one layer's KV for one block: [2, block_size, KH, D]."""
        return (2, self.block_size, self.num_kv_heads, self.head_dim)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVLayout":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_peer(self, theirs: "KVLayout") -> None:
        """Raise HandshakeError naming the first field in which `theirs` differs."""
        order = ["protocol_version", "model_fingerprint", "dtype", "block_size", "layout", "num_layers", "num_kv_heads", "head_dim"]
        for name in order:
            mine, other = getattr(self, name), getattr(theirs, name)
            if mine != other:
                raise HandshakeError(name, mine, other)


@dataclass(frozen=True)
class TransferDescriptor:
    """What the decode side tells the prefill side: where a request's KV goes and how."""

    request_id: str
    block_ids: tuple[int, ...]  # decode-side blocks, in token order
    transport: str  # "torch" | "grpc" | "local"
    endpoint: str  # the decode worker's KV endpoint for that transport
    layout: KVLayout
    lease_expiry_unix: float
    decode_worker_id: str
    num_cached_blocks: int = 0  # the first blocks already hold this KV on the decode side: not sent
    secret: str = ""  # one-time, per reservation: every payload, commit and abort must carry it


@dataclass(frozen=True)
class FirstToken:
    """The token the prefill side sampled, handed to the decode side with the KV's commit."""

    token: int
    logprob: float = 0.0
    top_logprobs: tuple[tuple[int, float], ...] = ()  # what the request asked for (SamplingParams.top_logprobs)

    def to_dict(self) -> dict:
        return {"token": self.token, "logprob": self.logprob, "top_logprobs": [list(p) for p in self.top_logprobs]}

    @classmethod
    def from_dict(cls, d: dict) -> "FirstToken":
        return cls(int(d["token"]), float(d["logprob"]), tuple((int(i), float(lp)) for i, lp in d.get("top_logprobs", ())))

