"""A context-parallel rank computes with the cluster's engine settings, as the engines do."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from splitserve.cluster.redis_server import free_port
from splitserve.engine.cpu_linear import PackedLinear
from splitserve.prefill_worker.cp import CPRank


@pytest.mark.parametrize("kernel, packed", [("torch", False), ("onednn", True)])
def test_a_rank_multiplies_with_the_linear_kernel_it_is_given(llama_dir: Path, kernel: str, packed: bool) -> None:
    rank = CPRank(str(llama_dir), rank=0, world=1, store=f"127.0.0.1:{free_port()}", block_size=16, sender_id="cp-test", dtype="float32",
                  linear_kernel=kernel)
    try:
        linears = [m for m in rank.model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
        assert linears and all(isinstance(m, PackedLinear) == packed for m in linears)
    finally:
        rank.close()


def test_an_unknown_kernel_is_refused_naming_it(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="linear_kernel.*'mkl'"):
        CPRank(str(llama_dir), rank=0, world=1, store=f"127.0.0.1:{free_port()}", block_size=16, sender_id="cp-test", dtype="float32",
               linear_kernel="mkl")
