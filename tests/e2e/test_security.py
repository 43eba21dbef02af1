"""Internal services let no one in: the cluster token on every worker RPC and KV port, the
embedded Redis behind a password on loopback, a registry reached over rediss:// (TLS), and TLS
on the public endpoints and every internal gRPC port."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import grpc
import httpx
import pytest
import redis

from splitserve.cluster.redis_server import EmbeddedRedis
from splitserve.cluster.registry import Registry, WorkerRecord
from splitserve.kv_transfer.grpc_transport import RAW_PUSH
from splitserve.proto import kv_pb2, worker_pb2
from splitserve.proto.client import Client, UnavailableError
from splitserve.proto.tls import TLSFiles
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


@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_tls_on_the_public_endpoints_and_every_internal_grpc_port(make_cluster, tmp_path: Path, transport: str) -> None:
    """A cluster whose cluster.yaml has `tls`: the SDK and HTTPS clients that trust its CA are
    served (the router's calls to the workers and the prefill worker's KV handshake and pushes
    go over TLS too, else nothing would be); plaintext is refused at every port."""
    certs = make_certs(tmp_path)
    tls = {"cert": str(certs.server_cert), "key": str(certs.server_key), "ca": str(certs.ca_cert)}
    c = make_cluster(cluster_token="s3cret-token", tls=tls, kv_transfer={"transport": transport})
    c.start(("prefill", []), ("decode", ["--transports", transport, "--default-transport", transport]))
    assert c.http.startswith("https://")
    with c.client(timeout=60) as sdk:
        r = sdk.generate("hello", max_tokens=4, temperature=0)
        assert r.finish_reason == "length" and r.timings["kv_bytes"] > 0 and r.timings["path"] == "disaggregated"
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
    ok = httpx.post(c.http + "/v1/completions", json=body, verify=ssl.create_default_context(cafile=certs.ca_cert), timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"

    with pytest.raises(httpx.ConnectError):  # the CA is checked: a client that does not trust it is refused
        httpx.post(c.http + "/v1/completions", json=body, timeout=10)
    # plaintext HTTP to the HTTPS port: the server drops the connection unanswered (a close or,
    # when the request's bytes are still unread there, a reset: which one is the kernel's timing)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.post(c.http.replace("https://", "http://") + "/v1/completions", json=body, timeout=10)
    with Client(c.grpc, timeout=10) as plain, pytest.raises(UnavailableError):
        plain.generate("hello", max_tokens=2)
    for w in c.workers.values():
        role = w.ready["role"]
        with pytest.raises(grpc.RpcError) as e:  # the token, but plaintext
            WorkerStub(w.address, "s3cret-token").stats(role)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        assert WorkerStub(w.address, "s3cret-token", TLSFiles(**tls)).stats(role).worker_id == w.worker_id
    c.assert_idle()


def test_tls_files_are_checked_when_the_config_is_loaded(tmp_path: Path) -> None:
    from splitserve.cluster.config import ConfigError, parse_cluster_config

    certs = make_certs(tmp_path)
    with pytest.raises(ConfigError, match=r"tls\.key: must be a readable PEM file"):
        parse_cluster_config({"model": {"path": "m"}, "tls": {"cert": str(certs.server_cert), "key": str(tmp_path / "nope"), "ca": str(certs.ca_cert)}})


def test_worker_specs_carry_the_tls_files_to_ray_actors(tmp_path: Path) -> None:
    from splitserve.cluster.worker_runtime import WorkerSpec

    tls = TLSFiles("c.pem", "k.pem", "ca.pem", server_name="workers.splitserve")
    spec = WorkerSpec(role="decode", worker_id="d", model="m", tls=tls)
    assert WorkerSpec(**json.loads(spec.to_json())).tls == tls  # how the controller hands a spec to a Ray actor
