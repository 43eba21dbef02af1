"""Command-line flags for an engine, shared by every process that runs one."""

from __future__ import annotations

import argparse

from splitserve.engine.config import ATTENTION_BACKENDS, DTYPES, LINEAR_KERNELS, EngineConfig
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
    g.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="auto: FlashInfer, then flash-attn, on CUDA when installed; SDPA otherwise")
    g.add_argument("--linear-kernel", default="torch", choices=LINEAR_KERNELS,
                   help="onednn: weights packed for oneDNN on CPU (faster; float32 no longer bitwise equal to transformers)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on CUDA (default: captured graphs where possible)")
    g.add_argument("--num-threads", type=int, default=None, help="PyTorch intra-op threads (default: PyTorch's choice)")


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
        attention_backend=args.attention_backend,
        linear_kernel=args.linear_kernel,
        num_threads=args.num_threads,
        cuda_graphs=not args.no_cuda_graphs,
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_prefill_chunk=args.max_prefill_chunk,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
    )
