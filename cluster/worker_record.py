"""What a worker says about itself (published in Redis by its heartbeat when it is in a
cluster). Free of Redis, so that a worker started on its own needs no Redis client."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class WorkerRecord:
    worker_id: str
    role: str  # "prefill" | "decode"
    address: str
    state: str = "ready"  # "starting" | "ready" | "draining" | "drained"
    model_fingerprint: str = ""
    layout: dict = field(default_factory=dict)
    load: dict = field(default_factory=dict)  # engine stats: running, waiting, queued_prefill_tokens, blocks...
    heartbeat: float = 0.0  # unix time of the last beat
    pid: int = 0
    restarts: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "WorkerRecord":
        return cls(**json.loads(text))
