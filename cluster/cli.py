"""The `splitserve` command line.

    splitserve serve --model DIR           everything on this machine: Redis, Ray, pools, router
    splitserve up -f cluster.yaml          on an existing Ray cluster and Redis (--no-router: the controller alone)
    splitserve status | scale prefill=N decode=M | drain WORKER | down     (via the router)
    splitserve bench ...                   load generator: TTFT/TPOT/ITL/E2E and goodput
    splitserve model init-tiny DIR         a random-weight checkpoint, offline
    splitserve generate --model DIR [PROMPT ...]     offline generation with one engine
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from splitserve.engine.errors import EngineError
from splitserve.engine.tiny_checkpoint import ARCHS, TinySpec
from splitserve.proto.client import SplitserveError


def _init_tiny(args: argparse.Namespace) -> int:
    from splitserve.engine.tiny_checkpoint import write_tiny_checkpoint

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
    existed = Path(args.dir).exists() and any(Path(args.dir).iterdir())
    out = write_tiny_checkpoint(args.dir, spec, overwrite=args.force)
    print(f"{'kept the same' if existed and not args.force else 'wrote'} {args.arch} checkpoint {'in' if existed and not args.force else 'to'} {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from splitserve.engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for out in llm.generate(prompts, params):
        print(out.text)
    return 0


def _run_cluster(config, embedded_redis: bool, with_router: bool = True, keep_workers: bool = False) -> int:
    from splitserve.cluster.config import ConfigError
    from splitserve.cluster.serve import start_cluster, wait_for_signal

    if config.kv_transfer.transport == "local":
        raise ConfigError("kv_transfer.transport", "'local' needs both workers in one process, and a cluster runs them in separate ones: use 'grpc' or 'torch'")
    if config.cluster_token is None:
        if embedded_redis:  # a cluster of this run alone: its internal services get a token of their own
            config = dataclasses.replace(config, cluster_token=secrets.token_urlsafe(24))
        else:
            logging.getLogger("splitserve").warning("cluster_token is not set: the workers' RPC and KV ports accept calls from anyone who "
                                                    "can reach them; set cluster_token (e.g. cluster_token: ${SPLITSERVE_CLUSTER_TOKEN})")

    running = start_cluster(config, embedded_redis=embedded_redis, fresh=embedded_redis, with_router=with_router, keep_workers=keep_workers)
    try:
        r = running.router
        adopted = f"; adopted {len(running.adopted)} running workers: {', '.join(running.adopted)}" if running.adopted else ""
        if r is None:
            print(f"splitserve ready: controller only (model {config.model.path}, {pools(config)}{adopted}); "
                  "routers: python -m splitserve.router -f FILE", flush=True)
        else:
            print(f"splitserve ready: http {r.http_address}  grpc {r.grpc_address}  (model {config.model.path}, {pools(config)}{adopted})", flush=True)
        wait_for_signal()
        print(f"splitserve: shutting down (requests in flight get up to {config.router.drain_timeout_s:g} s to finish)"
              if with_router else "splitserve: shutting down", flush=True)
    finally:
        running.stop()
    return 0


def pools(config) -> str:
    if config.colocated:
        return f"{config.decode.replicas} colocated workers (prefill and decode on each)"
    return f"{config.prefill.replicas} prefill, {config.decode.replicas} decode, transport {config.kv_transfer.transport}"


def serve_config(args: argparse.Namespace):
    """`splitserve serve`'s cluster.yaml: --config (or the defaults) with the flags given over it."""
    from splitserve.cluster.config import load_cluster_config, parse_cluster_config

    overrides = {
        "model.path": args.model, "model.dtype": args.dtype, "model.linear_kernel": args.linear_kernel, "router.http_port": args.http_port, "router.grpc_port": args.grpc_port,
        "prefill.replicas": args.prefill, "decode.replicas": args.decode, "kv_transfer.transport": args.transport,
        "router.host": args.host, "name": args.name, "prefill.cp_degree": args.prefill_cp, "router.policy": args.routing_policy,
        "routing.local_prefill_tokens": args.local_prefill_tokens, "colocated": True if args.colocated else None,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return load_cluster_config(args.config, overrides) if args.config else parse_cluster_config({}, overrides)


def _serve(args: argparse.Namespace) -> int:
    config = serve_config(args)
    return _run_cluster(config, embedded_redis=config.redis_url is None)


def _up(args: argparse.Namespace) -> int:
    from splitserve.cluster.config import load_cluster_config

    return _run_cluster(load_cluster_config(args.file), embedded_redis=False, with_router=not args.no_router, keep_workers=args.keep_workers)


def _client(args: argparse.Namespace):
    from splitserve.proto.client import Client

    return Client(args.router, api_key=args.api_key, tls=args.tls_ca or False)


def _status(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    with _client(args) as c:
        st = c.status()
    targets = " ".join(f"{k}={v}" for k, v in sorted(st.targets.items()))
    table = Table(title=f"cluster {st.cluster}  model {st.model}  targets {targets}", box=box.SIMPLE_HEAD, show_edge=False,
                  title_justify="left")
    for col in ("WORKER", "ROLE", "STATE", "RUNNING", "QUEUED_TOK", "BLOCKS_USED", "BLOCKS_FREE", "RESERVED", "BEAT_AGE", "ADDRESS"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("RUNNING", "QUEUED_TOK", "BLOCKS_USED", "BLOCKS_FREE", "RESERVED") else "left")
    for w in sorted(st.workers, key=lambda w: (w.role, w.worker_id)):
        table.add_row(w.worker_id, w.role, w.state, str(w.running), str(w.queued_prefill_tokens), str(w.used_blocks), str(w.free_blocks),
                      str(w.reserved_blocks), f"{w.heartbeat_age:.1f}s", w.address)
    Console(width=200).print(table)  # a pipe gets the whole table, not one cut to 80 columns
    return 0


def _scale(args: argparse.Namespace) -> int:
    wanted: dict[str, int] = {}
    for item in args.pools:
        role, _, n = item.partition("=")
        if role not in ("prefill", "decode") or not re.fullmatch(r"[0-9]{1,9}", n) or role in wanted:
            print(f"splitserve: error: {item!r}: expected prefill=N or decode=N (a count, each pool once)", file=sys.stderr)
            return 2
        wanted[role] = int(n)
    with _client(args) as c:
        st = c.scale(**wanted)
    print("targets " + " ".join(f"{k}={v}" for k, v in sorted(st.targets.items())))
    return 0


def _drain(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.drain(args.worker)
    print(f"draining {args.worker}: it takes no new requests, finishes its running ones, then stops; "
          "its pool's target is one lower, so it is not replaced (`splitserve scale` to restore it)")
    return 0


def _down(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.shutdown()
    print("scaling every pool to 0: workers drain and stop; stop the `up`/`serve` process to remove the router")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from splitserve.cluster.bench import run_bench

    return run_bench(args)


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
    tiny.add_argument("--force", action="store_true", help="write into a folder that holds something else (replacing its checkpoint)")
    tiny.set_defaults(func=_init_tiny)

    serve = sub.add_parser("serve", help="run a whole cluster on this machine (embedded Redis and Ray)")
    serve.add_argument("--model", help="Hugging Face checkpoint folder (or model.path in --config)")
    serve.add_argument("--config", "-f", help="cluster.yaml; flags override it")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--linear-kernel", choices=["torch", "onednn"],
                       help="onednn: linear layers packed for oneDNN on CPU (about 2x faster there; float32 no longer bitwise equal to transformers)")
    serve.add_argument("--host", help="address to serve on (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP port (0 = any free; default 8000)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (0 = any free; default 50051)")
    serve.add_argument("--prefill", type=int, help="prefill workers (default 1)")
    serve.add_argument("--decode", type=int, help="decode workers (default 1)")
    serve.add_argument("--transport", choices=["torch", "grpc", "local"], help="KV transport (default grpc)")
    serve.add_argument("--prefill-cp", type=int, help="context-parallel ranks per prefill worker (default 1)")
    serve.add_argument("--routing-policy", choices=["workload_aware", "least_loaded", "round_robin"], help="default workload_aware")
    serve.add_argument("--colocated", action="store_true", help="the baseline: --decode N workers that each prefill and decode "
                       "on one engine (no prefill pool, no KV transfer), behind the same router and APIs")
    serve.add_argument("--local-prefill-tokens", type=int, help="workload_aware: a decode worker lacking at most this many prompt tokens "
                       "prefills them itself (0: always disaggregate; default 256)")
    serve.add_argument("--name", help="cluster name (namespaces Redis keys and Ray actors)")
    serve.set_defaults(func=_serve)

    up = sub.add_parser("up", help="run the controller and a router for cluster.yaml on an existing Ray cluster and Redis")
    up.add_argument("-f", "--file", required=True)
    up.add_argument("--no-router", action="store_true", help="run only the controller (routers run as `python -m splitserve.router -f FILE`)")
    up.add_argument("--keep-workers", action="store_true",
                    help="leave the workers serving when this controller stops or dies (Ray detached actors; needs ray_address); "
                         "the next `up --keep-workers` adopts them, replacing those whose settings cluster.yaml changed. "
                         "`splitserve down` still stops them")
    up.set_defaults(func=_up)

    def admin(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--router", default="127.0.0.1:50051", help="the router's gRPC address")
        p.add_argument("--api-key", default=None)
        p.add_argument("--tls-ca", default=None, help="PEM CA file of a router serving TLS (cluster.yaml tls.ca)")
        p.set_defaults(func=func)
        return p

    admin("status", "table of workers: role, state, load, blocks, address", _status)
    admin("scale", "set pool sizes, e.g. `scale prefill=2 decode=3`", _scale).add_argument("pools", nargs="+", metavar="ROLE=N")
    admin("drain", "stop sending work to a worker; it finishes what it runs, then exits", _drain).add_argument("worker")
    admin("down", "scale every pool to zero", _down)

    from splitserve.cluster.bench import add_bench_args

    bench = sub.add_parser("bench", help="load generator against the gRPC or HTTP API")
    add_bench_args(bench)
    bench.set_defaults(func=_bench)

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


# What `pip install "splitserve[serve]"` adds to the light client (SDK + admin CLI).
SERVE_EXTRA_MODULES = frozenset({"torch", "safetensors", "tokenizers", "numpy", "ray", "redis", "jinja2", "prometheus_client",
                                 "grpc_health", "grpc_reflection"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in SERVE_EXTRA_MODULES:
            raise
        print(f'splitserve: error: `splitserve {args.command}` needs the serve extra (module {missing!r} is missing): pip install "splitserve[serve]"',
              file=sys.stderr)
        return 2
    except SplitserveError as e:
        print(f"splitserve: error: {e.status}: {e}", file=sys.stderr)
        return 1
    except (EngineError, ValueError, OSError) as e:
        # a user's mistake: show the message, not a traceback
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__module__.split(".")[0] != "redis":  # redis-py's errors are not OSErrors
            raise
        print(f"splitserve: error: Redis: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
