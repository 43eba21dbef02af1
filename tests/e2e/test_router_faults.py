"""A leg's failure as the client sees it, through the router's front doors (gRPC SDK and HTTP):
the exact status, a message naming the worker and what failed, bounded time, and no worker left
holding reserved blocks."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.parse

import pytest

from splitserve.proto.client import (
    FailedPreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)
from tests.e2e.local_cluster import InThread, post, wait_until

LONG_PROMPT = [3 + (i * 37) % 490 for i in range(3000)]


def assert_http_error(got: tuple[int, dict, dict], code: int, *needles: str) -> None:
    status, body, headers = got
    assert status == code, (status, body)
    message = body["error"]["message"]
    for n in needles:
        assert n in message, (n, message)
    if code in (429, 503):
        assert headers.get("retry-after") == "1"


def test_decode_worker_killed_mid_stream(make_cluster) -> None:
    c = make_cluster(router={"max_retries": 0}).start(("prefill", []), ("decode", []))
    (d,) = [w for w in c.workers.values() if w.ready["role"] == "decode"]
    with c.client(timeout=60) as sdk:
        stream = sdk.generate_stream([5] * 20, max_tokens=3000, temperature=0, ignore_eos=True)
        next(stream)
        over_http = InThread(lambda: post(c.http, {"prompt": [6] * 20, "max_tokens": 3000, "temperature": 0, "ignore_eos": True}))
        wait_until(lambda: c.stats(d).running_requests == 2, 30, "both requests decoding")
        start = time.monotonic()
        d.kill()
        with pytest.raises(UnavailableError) as e:
            for _ in stream:
                pass
        assert e.value.status == "UNAVAILABLE"
        assert f"decode worker {d.worker_id}" in str(e.value), str(e.value)
        assert_http_error(over_http.result(), 503, f"decode worker {d.worker_id}")
        assert time.monotonic() - start < 10
    c.assert_idle()


def test_prefill_worker_killed_mid_prefill_after_the_retries(make_cluster) -> None:
    c = make_cluster(router={"max_retries": 1}).start(("prefill", ["--max-prefill-chunk", "4"]), ("decode", []))
    (p,) = [w for w in c.workers.values() if w.ready["role"] == "prefill"]
    with c.client(timeout=60) as sdk:
        over_grpc = InThread(lambda: sdk.generate(LONG_PROMPT, max_tokens=4, temperature=0))
        over_http = InThread(lambda: post(c.http, {"prompt": LONG_PROMPT[::-1], "max_tokens": 4, "temperature": 0}))
        wait_until(lambda: c.stats(p).running_requests + c.stats(p).waiting_requests == 2, 30, "both prompts on the prefill worker")
        p.kill()
        with pytest.raises(UnavailableError) as e:
            over_grpc.result()
        message = str(e.value)
        assert f"prefill worker {p.worker_id}" in message and "no other prefill worker to retry on" in message, message
        assert_http_error(over_http.result(), 503, f"prefill worker {p.worker_id}")
    c.assert_idle()


def test_prefill_worker_killed_before_the_first_token_is_retried_elsewhere(make_cluster) -> None:
    c = make_cluster(router={"max_retries": 1, "policy": "round_robin"})
    c.start(("prefill", ["--max-prefill-chunk", "4"]), ("prefill", ["--max-prefill-chunk", "4"]), ("decode", []))
    prefills = [w for w in c.workers.values() if w.ready["role"] == "prefill"]
    with c.client(timeout=60) as sdk:
        done = InThread(lambda: sdk.generate(LONG_PROMPT, max_tokens=8, temperature=0, ignore_eos=True))
        wait_until(lambda: any(c.stats(p).running_requests for p in prefills), 30, "the prompt on a prefill worker")
        victim = next(p for p in prefills if c.stats(p).running_requests)
        victim.kill()
        out = done.result()
        assert out.timings["retries"] == 1 and out.timings["prefill_worker"] != victim.worker_id
        again = sdk.generate(LONG_PROMPT, max_tokens=8, temperature=0, ignore_eos=True)  # uninterrupted
        assert out.token_ids == again.token_ids and out.text == again.text and len(out.token_ids) == 8
    c.assert_idle()


def test_decode_kv_capacity_exhausted(make_cluster) -> None:
    c = make_cluster(router={"max_retries": 1}).start(("prefill", []), ("decode", ["--num-kv-blocks", "64"]))
    (d,) = [w for w in c.workers.values() if w.ready["role"] == "decode"]
    with c.client(timeout=60) as sdk:
        hog = sdk.generate_stream(LONG_PROMPT[:600], max_tokens=400, temperature=0, ignore_eos=True)  # 38+ of 64 blocks
        next(hog)
        with pytest.raises(ResourceExhaustedError) as e:
            sdk.generate(LONG_PROMPT[1000:1500], max_tokens=4, temperature=0)  # shares no prefix with the hog
        assert e.value.status == "RESOURCE_EXHAUSTED" and f"decode worker {d.worker_id}" in str(e.value), str(e.value)
        assert_http_error(post(c.http, {"prompt": LONG_PROMPT[2000:2500], "max_tokens": 4}), 429, f"decode worker {d.worker_id}", "free blocks")
        hog.close()
    c.assert_idle()


def test_lease_expiry_while_the_prefill_worker_is_stalled(make_cluster) -> None:
    """No KV within the decode worker's lease while the prefill call still runs: the prefill
    worker is what failed (UNAVAILABLE naming it, and the lease), not the decode worker."""
    c = make_cluster(router={"max_retries": 0}).start(("prefill", []), ("decode", ["--lease-seconds", "1"]))
    (p,) = [w for w in c.workers.values() if w.ready["role"] == "prefill"]
    (d,) = [w for w in c.workers.values() if w.ready["role"] == "decode"]
    os.kill(p.popen.pid, signal.SIGSTOP)  # alive but silent: no KV ever arrives
    try:
        with c.client(timeout=60) as sdk:
            start = time.monotonic()
            over_http = InThread(lambda: post(c.http, {"prompt": "a stalled prefill", "max_tokens": 4}))
            with pytest.raises(UnavailableError) as e:
                sdk.generate("a stalled prefill", max_tokens=4)
            message = str(e.value)
            assert f"prefill worker {p.worker_id}" in message and f"decode worker {d.worker_id}" in message and "lease expired" in message, message
            assert_http_error(over_http.result(), 503, "lease expired")
            assert time.monotonic() - start < 10  # the lease, not the request's 600 s deadline
    finally:
        os.kill(p.popen.pid, signal.SIGCONT)
    c.assert_idle()
    with c.client(timeout=60) as sdk:  # and the cluster serves again
        assert sdk.generate("after the stall", max_tokens=4, temperature=0).finish_reason == "length"


def test_a_stalled_prefill_worker_is_retried_on_another_once_the_lease_runs_out(make_cluster) -> None:
    c = make_cluster(router={"max_retries": 1, "policy": "round_robin"}, routing={"local_prefill_tokens": 0})
    c.start(("prefill", []), ("prefill", []), ("decode", ["--lease-seconds", "1"]))
    stalled = next(w for w in c.workers.values() if w.ready["role"] == "prefill")
    os.kill(stalled.popen.pid, signal.SIGSTOP)
    try:
        with c.client(timeout=60) as sdk:
            outs = [sdk.generate(f"request {i}", max_tokens=4, temperature=0) for i in range(2)]  # round robin: one meets it
        assert all(o.finish_reason == "length" and o.timings["prefill_worker"] != stalled.worker_id for o in outs)
        assert sorted(o.timings["retries"] for o in outs) == [0, 1]
    finally:
        os.kill(stalled.popen.pid, signal.SIGCONT)
    c.assert_idle()


def test_handshake_mismatch_between_the_pair(make_cluster) -> None:
    c = make_cluster(router={"max_retries": 0}).start(("prefill", []), ("decode", ["--block-size", "32"]))
    (d,) = [w for w in c.workers.values() if w.ready["role"] == "decode"]
    with c.client(timeout=60) as sdk:
        with pytest.raises(FailedPreconditionError) as e:
            sdk.generate("mismatched workers", max_tokens=4)
        assert e.value.status == "FAILED_PRECONDITION"
        assert f"decode worker {d.worker_id}" in str(e.value) and "block_size differs (receiver 32, sender 16)" in str(e.value), str(e.value)
    assert_http_error(post(c.http, {"prompt": "mismatched workers", "max_tokens": 4}), 400, "block_size differs")
    c.assert_idle()



@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_decode_worker_lost_while_its_kv_streams_in_is_retried_on_another(make_cluster, fault: str) -> None:
    """The decode worker receiving a prompt's KV dies, or stops answering (SIGSTOP: its
    connections stay up, keepalive pings find it). The decode leg is what failed: the request is
    retried on the other decode worker with the same (only) prefill worker (which was blamed and
    excluded), and the prefill worker lets go of the prompt's blocks while a hung worker is still
    stopped (it held them, and the client waited, until the worker resumed)."""
    c = make_cluster(router={"max_retries": 1}, routing={"local_prefill_tokens": 0})
    c.start(("prefill", ["--max-prefill-chunk", "4"]), ("decode", []), ("decode", []))
    (p,) = [w for w in c.workers.values() if w.ready["role"] == "prefill"]
    decodes = [w for w in c.workers.values() if w.ready["role"] == "decode"]
    with c.client(timeout=120) as sdk:
        done = InThread(lambda: sdk.generate(LONG_PROMPT, max_tokens=8, temperature=0, ignore_eos=True))
        wait_until(lambda: c.stats(p).running_requests and any(c.stats(d).reserved_blocks for d in decodes), 30, "the KV streaming in")
        victim = next(d for d in decodes if c.stats(d).reserved_blocks)
        os.kill(victim.popen.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        try:
            out = done.result()
            assert out.timings["retries"] == 1 and out.timings["decode_worker"] != victim.worker_id and out.timings["prefill_worker"] == p.worker_id
            wait_until(lambda: c.stats(p).used_blocks == 0 and c.stats(p).running_requests == 0, 30, "the prefill worker to let go")
        finally:
            if fault == "hung":
                os.kill(victim.popen.pid, signal.SIGCONT)
        again = sdk.generate(LONG_PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
        assert out.token_ids == again.token_ids and len(out.token_ids) == 8
    c.assert_idle()


def test_a_streamed_client_that_leaves_before_its_first_token_ends_its_request(make_cluster) -> None:
    """Before the first token (here: a prefill worker that stopped) a streamed request's client
    was not watched: it held its router slot and the decode worker's reservation until its
    first token or its lease, long after its client had gone."""
    c = make_cluster(router={"max_retries": 0}).start(("prefill", []), ("decode", ["--lease-seconds", "120"]))
    (p,) = [w for w in c.workers.values() if w.ready["role"] == "prefill"]
    (d,) = [w for w in c.workers.values() if w.ready["role"] == "decode"]
    os.kill(p.popen.pid, signal.SIGSTOP)
    try:
        u = urllib.parse.urlparse(c.http)
        body = json.dumps({"prompt": "a client that gives up", "stream": True, "max_tokens": 4}).encode()
        with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: c.stats(d).reserved_blocks > 0, 20, "the decode worker reserved the prompt's blocks")
        wait_until(lambda: c.stats(d).reserved_blocks == 0, 10, "the reservation freed once the client left (not at the 120 s lease)")
    finally:
        os.kill(p.popen.pid, signal.SIGCONT)
    c.assert_idle()


def test_a_stopped_router_finishes_the_requests_in_flight_and_refuses_new_ones(make_cluster) -> None:
    """SIGTERM (a rollout, a scale-down): the router closes its listeners and lets the streams
    in flight run to their end within router.drain_timeout_s. It gave them 2 s: every rollout
    cut the generations in flight."""
    import http.client

    c = make_cluster(router={"drain_timeout_s": 60}).start(("prefill", []), ("decode", []))
    router = c.routers[0]
    u = urllib.parse.urlparse(c.http)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"prompt": [7] * 20, "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    with c.client(timeout=60) as sdk:
        over_grpc = sdk.generate_stream([8] * 20, max_tokens=1500, temperature=0, ignore_eos=True)
        first = next(over_grpc)
        assert r.readline().startswith(b"data: ")  # both are under way
        started = time.monotonic()
        router.popen.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(OSError):  # the listener is closed: a new client goes to another router
            socket.create_connection((u.hostname, u.port), timeout=2).close()
        grpc_tokens = len(first.token_ids) + sum(len(chunk.token_ids) for chunk in over_grpc)
    events = [json.loads(line[6:]) for line in r.read().split(b"\n") if line.startswith(b"data: {")]
    assert grpc_tokens == 1500
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 1500
    assert router.popen.wait(60) == 0, "\n".join(router.log)
    took = time.monotonic() - started
    assert took > 2.0, f"the streams took {took:.1f} s: too short to tell a drain from the old 2 s cut (raise max_tokens)"
    c.assert_idle()
