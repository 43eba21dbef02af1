"""Which files hold a checkpoint's weights, and the checkpoint's identity: torch-free, so the
router can compute the fingerprint workers must match without loading any weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError("model.safetensors.index.json", "has no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError("model.safetensors", f"no safetensors weights in {model_dir}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f.name, "listed in model.safetensors.index.json but missing")
    return files


def checkpoint_fingerprint(config: ModelConfig, files: list[Path], window: int = 1 << 16) -> str:
    """Identity of a checkpoint (not an integrity check): its config, and of each weight file
    the size, the safetensors header and three sampled windows of bytes. Two checkpoints of
    one shape but different weights (fine-tunes, seeds) differ here, at a cost independent
    of the model's size."""
    h = hashlib.sha256(config.fingerprint.encode())
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 1 << 24)))
            for offset in (8 + header_len, (size + header_len) // 2, max(0, size - window)):
                f.seek(offset)
                h.update(f.read(window))
    return h.hexdigest()[:16]
