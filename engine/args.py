"""Command-line flags for an engine, shared by every process that runs one."""

from __future__ import annotations

import argparse

from splitserve.engine.config import DTYPES, EngineConfig
from splitserve.engine.scheduler import SchedulerConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument("--device", default="cpu")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="default: sized from --kv-cache-memory")
    g.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="bytes of KV cache when --num-kv-blocks is not given")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-prefill-chunk", type=int, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--seed", type=int, default=0)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        seed=args.seed,
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_prefill_chunk=args.max_prefill_chunk,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
    )
