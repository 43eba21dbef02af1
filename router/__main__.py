"""Run a router process alone: `python -m splitserve.router -f cluster.yaml [--redis-url URL] [--http-port N] [--grpc-port N]`.

Several routers can serve one cluster: they share nothing but the Redis registry. Prints one
JSON ready line with its addresses; stops on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging

from redis.exceptions import RedisError

from splitserve.cluster.config import load_cluster_config
from splitserve.proto.server import announce
from splitserve.router.app import Router


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitserve.router", description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--file", required=True, help="cluster.yaml")
    parser.add_argument("--redis-url", default=None, help="overrides redis_url in the file")
    parser.add_argument("--http-port", type=int, default=None)
    parser.add_argument("--grpc-port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_cluster_config(args.file, {"redis_url": args.redis_url} if args.redis_url else None)
    except (ValueError, OSError) as e:  # ConfigError names the key; a missing file
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if not config.redis_url:
        parser.error("redis_url: needed (in the file or --redis-url)")
    try:
        router = Router(config, config.redis_url, http_port=args.http_port, grpc_port=args.grpc_port)
    except (OSError, RedisError) as e:  # a port in use, Redis unreachable
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    announce(role="router", http=router.http_address, grpc=router.grpc_address)
    from splitserve.cluster.serve import wait_for_signal

    try:
        wait_for_signal()
    finally:
        router.stop()


if __name__ == "__main__":
    main()
