"""Internal services let no one in: the cluster token on every worker RPC and KV port, the
embedded Redis behind a password on loopback, and a registry reached over rediss:// (TLS)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import redis

from splitserve.cluster.redis_server import EmbeddedRedis
from splitserve.cluster.registry import Registry, WorkerRecord
from splitserve.kv_transfer.grpc_transport import RAW_PUSH
from splitserve.proto import kv_pb2, worker_pb2
from tests.certs import make_certs
from tests.e2e.workers import WorkerStub


def test_worker_rpcs_and_kv_ports_need_the_cluster_token(make_cluster) -> None:
    c = make_cluster(cluster_token="s3cret-token").start(("prefill", []), ("decode", []))
    with c.client(timeout=60) as sdk:  # the router holds the token: requests are served
        assert sdk.generate("hello", max_tokens=4, temperature=0).finish_reason == "length"
    for w in c.workers.values():
        anonymous = WorkerStub(w.address)
        role = w.ready["role"]
        with pytest.raises(grpc.RpcError) as e:
            anonymous.stats(role)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        wrong = WorkerStub(w.address, "not-the-token")
        with pytest.raises(grpc.RpcError) as e:
            wrong.stats(role)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        if role == "decode":
            for call in (lambda: anonymous.kv.Handshake(kv_pb2.HandshakeRequest(sender_id="intruder", transport="torch"), timeout=10),
                         lambda: anonymous.kv.Push(iter([kv_pb2.KVMessage(abort=kv_pb2.KVAbort(request_id="x"))]), timeout=10),
                         lambda: anonymous.channel.stream_unary(RAW_PUSH)(iter([b""]), timeout=10),
                         lambda: anonymous.decode.Reserve(worker_pb2.ReserveRequest(request_id="x", prompt_token_ids=[1]), timeout=10)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    c.assert_idle()


def test_embedded_redis_is_on_loopback_behind_a_password() -> None:
    server = EmbeddedRedis()
    try:
        assert server.host == "127.0.0.1" and server.password and f":{server.password}@" in server.url
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port, socket_timeout=2).ping()
        assert redis.Redis.from_url(server.url, socket_timeout=2).ping()
        assert server.password not in " ".join(Path(f"/proc/{server.proc.pid}/cmdline").read_text().split("\0"))
    finally:
        server.stop()


def test_the_registry_over_rediss(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = EmbeddedRedis(tls=(str(certs.server_cert), str(certs.server_key), str(certs.ca_cert)))
    try:
        assert server.url.startswith("rediss://")
        registry = Registry(server.url, "tls")
        registry.publish(WorkerRecord("w1", "decode", "127.0.0.1:1"))
        assert [w.worker_id for w in registry.workers()] == ["w1"]
        with pytest.raises(redis.ConnectionError):  # plaintext to a TLS port
            redis.Redis(host=server.host, port=server.port, password=server.password, socket_timeout=2).ping()
    finally:
        server.stop()
