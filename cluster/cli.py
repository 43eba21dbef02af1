"""The `splitserve` command line.

    splitserve model init-tiny DIR [--arch llama|qwen2|mistral] [size flags]
    splitserve generate --model DIR [PROMPT ...]     offline generation with the engine
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from engine.errors import EngineError
from engine.tiny_checkpoint import ARCHS, TinySpec


def _init_tiny(args: argparse.Namespace) -> int:
    from engine.tiny_checkpoint import write_tiny_checkpoint

    spec = TinySpec(
        arch=args.arch,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.max_position_embeddings,
        rope_scaling=args.rope_scaling,
        tie_word_embeddings=args.tie_word_embeddings,
        sliding_window=args.sliding_window,
        dtype=args.dtype,
        seed=args.seed,
        shard_size=args.shard_size,
    )
    out = write_tiny_checkpoint(args.dir, spec)
    print(f"wrote {args.arch} checkpoint to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for out in llm.generate(prompts, params):
        print(out.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated prefill/decode LLM serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model checkpoints").add_subparsers(dest="model_command", required=True)
    tiny = model.add_parser("init-tiny", help="write a random-weight Hugging Face checkpoint folder (offline)")
    tiny.add_argument("dir", help="output folder")
    tiny.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    d = TinySpec()
    tiny.add_argument("--hidden-size", type=int, default=d.hidden_size)
    tiny.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    tiny.add_argument("--num-layers", type=int, default=d.num_layers)
    tiny.add_argument("--num-heads", type=int, default=d.num_heads)
    tiny.add_argument("--num-kv-heads", type=int, default=d.num_kv_heads)
    tiny.add_argument("--head-dim", type=int, default=None)
    tiny.add_argument("--vocab-size", type=int, default=d.vocab_size)
    tiny.add_argument("--max-position-embeddings", type=int, default=d.max_position_embeddings)
    tiny.add_argument("--rope-scaling", choices=["llama3"], default=None)
    tiny.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None)
    tiny.add_argument("--sliding-window", type=int, default=None, help="mistral only")
    tiny.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=d.dtype)
    tiny.add_argument("--seed", type=int, default=d.seed)
    tiny.add_argument("--shard-size", type=int, default=None, help="bytes per safetensors shard")
    tiny.set_defaults(func=_init_tiny)

    gen = sub.add_parser("generate", help="offline generation with one in-process engine")
    gen.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("prompt", nargs="*", help="prompts (default: one per line on stdin)")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (EngineError, ValueError, OSError) as e:
        # a user's mistake: show the message, not a traceback
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
