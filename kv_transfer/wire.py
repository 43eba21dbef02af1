"""KV payloads on the wire: headers, tensors <-> bytes, and the checks done on arrival."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from splitserve.kv_transfer.errors import PayloadError
from splitserve.kv_transfer.layout import KVLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Above this a gRPC message is split by blocks (gRPC's default limit is 4 MiB per message).
MAX_MESSAGE_BYTES = 8 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PayloadHeader:
    """One layer's KV for some of a request's blocks: [len(block_ids), 2, block_size, KH, D]."""

    request_id: str
    layer: int
    block_ids: tuple[int, ...]
    dtype: str
    shape: tuple[int, ...]
    byte_length: int
    secret: str = ""  # the reservation's (TransferDescriptor.secret)

    @classmethod
    def for_tensor(cls, request_id: str, secret: str, layer: int, block_ids: list[int], kv: torch.Tensor) -> "PayloadHeader":
        return cls(request_id, layer, tuple(block_ids), dtype_name(kv.dtype), tuple(kv.shape), kv.numel() * kv.element_size(), secret)

    def check(self, layout: KVLayout) -> None:
        """Raise PayloadError unless dtype, shape and size agree with each other and the layout."""
        if self.dtype != layout.dtype:
            raise PayloadError(f"payload dtype {self.dtype!r}, expected {layout.dtype!r}")
        expected = (len(self.block_ids), *layout.block_shape)
        if self.shape != expected:
            raise PayloadError(f"payload shape {list(self.shape)}, expected {list(expected)}")
        size = math.prod(expected) * DTYPES[self.dtype].itemsize
        if self.byte_length != size:
            raise PayloadError(f"payload declares {self.byte_length} bytes, shape and dtype make {size}")


def to_bytes(kv: torch.Tensor) -> bytes:
    return kv.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def copy_bytes_into(dest: torch.Tensor, data: bytes, header: PayloadHeader) -> None:
    """Copy a payload's bytes into `dest`, which has the header's shape and dtype."""
    if len(data) != header.byte_length:
        kind = "truncated" if len(data) < header.byte_length else "oversized"
        raise PayloadError(f"{kind} payload: {len(data)} bytes, header says {header.byte_length}")
    with warnings.catch_warnings():  # read-only bytes are fine: they are only read from
        warnings.simplefilter("ignore", UserWarning)
        src = torch.frombuffer(data, dtype=torch.uint8)
    dest.copy_(src.view(DTYPES[header.dtype]).view(header.shape))
