"""`splitserve bench`: its statistics on hand-made records, its workload generators, and whole
runs against a fake gRPC Generation server and a fake HTTP SSE server started here."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest

from splitserve.cluster.bench import (
    RequestRecord,
    arrival_times,
    fill_timings,
    length_range,
    load_dataset,
    meets_slo,
    percentile,
    summarize,
    synthetic_requests,
)
from splitserve.cluster.cli import main
from splitserve.proto import public_pb2, public_pb2_grpc


# ---- statistics -----------------------------------------------------------------------------
def test_percentile_matches_numpy_linear_interpolation() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101, 1000):
        xs = rng.exponential(5.0, n).tolist()
        for p in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_ttft_itl_tpot_from_chunk_times() -> None:
    rec = RequestRecord(0)
    # sent at 10.0; chunks of 1, 2 and 1 tokens; a 2-token chunk spreads its gap over both tokens
    fill_timings(rec, 10.0, [(10.1, 1), (10.5, 2), (10.6, 1)], 10.7, usage_tokens=None)
    assert rec.ttft == pytest.approx(0.1) and rec.e2e == pytest.approx(0.7) and rec.output_tokens == 4
    assert rec.itl == pytest.approx([0.2, 0.2, 0.1])
    assert rec.tpot == pytest.approx((0.7 - 0.1) / 3)
    fill_timings(rec, 10.0, [(10.1, 1), (10.5, 2)], 10.6, usage_tokens=5)  # the server's usage wins over the chunk count
    assert rec.output_tokens == 5 and rec.tpot == pytest.approx(0.5 / 4)
    one = RequestRecord(1)
    fill_timings(one, 0.0, [(0.3, 1)], 0.4, None)
    assert one.tpot is None and one.itl == []
    assert RequestRecord(2, status="UNAVAILABLE").tpot is None


def _rec(i: int, ttft: float, e2e: float, out: int, prompt: int = 10, status: str = "OK") -> RequestRecord:
    itl = [(e2e - ttft) / (out - 1)] * (out - 1) if out > 1 else []
    return RequestRecord(i, status=status, prompt_tokens=prompt, output_tokens=out, ttft=ttft, e2e=e2e, itl=itl)


def test_summarize_on_hand_made_records() -> None:
    recs = [_rec(0, 0.1, 1.1, 11), _rec(1, 0.2, 2.2, 21), _rec(2, 0.4, 0.9, 6), _rec(3, 0.05, 0.05, 1),
            RequestRecord(4, status="UNAVAILABLE", error="x"), RequestRecord(5, status="RESOURCE_EXHAUSTED"), RequestRecord(6, status="UNAVAILABLE")]
    s = summarize(recs, duration=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (7, 4, 3)
    assert s["failed_by_status"] == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 2}
    assert s["input_tokens"] == 40 and s["output_tokens"] == 39
    assert s["request_throughput"] == pytest.approx(2.0) and s["output_throughput"] == pytest.approx(19.5)
    assert s["total_token_throughput"] == pytest.approx(39.5)
    ttfts = [100, 200, 400, 50]
    assert s["ttft_ms"]["mean"] == pytest.approx(np.mean(ttfts)) and s["ttft_ms"]["p90"] == pytest.approx(np.percentile(ttfts, 90))
    tpots = [100, 100, 100]  # (1.1-0.1)/10, (2.2-0.2)/20, (0.9-0.4)/5; the one-token request has none
    assert s["tpot_ms"]["mean"] == pytest.approx(100) and s["tpot_ms"]["p99"] == pytest.approx(np.percentile(tpots, 99))
    assert s["itl_ms"]["p50"] == pytest.approx(100) and len([x for r in recs for x in r.itl]) == 10 + 20 + 5
    assert s["e2e_ms"]["p50"] == pytest.approx(np.percentile([1100, 2200, 900, 50], 50))
    assert "goodput" not in s

    g = summarize(recs, 2.0, slo_ttft_ms=150)["goodput"]
    assert g["good"] == 2 and g["request_goodput"] == pytest.approx(1.0) and g["good_fraction"] == pytest.approx(2 / 7)
    g = summarize([_rec(0, 0.1, 1.1, 11), _rec(1, 0.1, 3.1, 11), _rec(2, 0.3, 0.3, 1)], 1.0, slo_ttft_ms=350, slo_tpot_ms=150)["goodput"]
    assert g["good"] == 2  # the second misses the TPOT SLO (300 ms); the one-token request has no TPOT and passes
    assert not meets_slo(RequestRecord(0, status="INTERNAL"), None, None)
    empty = summarize([], 0.0, slo_tpot_ms=1)
    assert empty["completed"] == 0 and empty["ttft_ms"]["p50"] is None and empty["goodput"]["good_fraction"] == 0


# ---- workload -------------------------------------------------------------------------------
def test_poisson_arrivals_have_mean_interarrival_one_over_rate() -> None:
    times = arrival_times(20000, rate=50.0, seed=1)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: coefficient of variation 1
    assert arrival_times(5, 50.0, seed=1) == times[:5] and arrival_times(5, 50.0, seed=2) != times[:5]
    assert arrival_times(4, float("inf")) == [0.0] * 4
    with pytest.raises(ValueError):
        arrival_times(3, 0.0)


def test_bursty_gamma_arrivals_keep_the_mean_and_raise_the_variance() -> None:
    poisson = np.diff(arrival_times(20000, rate=20.0, burstiness=1.0, seed=3))
    bursty = np.diff(arrival_times(20000, rate=20.0, burstiness=0.25, seed=3))
    assert bursty.mean() == pytest.approx(1 / 20, rel=0.05)
    assert bursty.var() == pytest.approx(1 / (0.25 * 20**2), rel=0.15)  # gamma: shape k, scale 1/(rate k) -> var 1/(k rate^2)
    assert bursty.var() > 2.5 * poisson.var()


def test_synthetic_prompts_stay_inside_the_length_range() -> None:
    reqs = synthetic_requests(500, input_len=100, output_len=20, range_ratio=0.5, vocab_size=300, seed=7)
    ins, outs = [len(r.prompt) for r in reqs], [r.max_tokens for r in reqs]
    assert min(ins) >= 50 and max(ins) <= 150 and min(outs) >= 10 and max(outs) <= 30
    assert max(ins) - min(ins) > 80  # spread over the range, not stuck at one length
    assert all(0 <= t < 300 for r in reqs for t in r.prompt) and all(r.ignore_eos for r in reqs)
    fixed = synthetic_requests(10, 8, 4, seed=1)
    assert {len(r.prompt) for r in fixed} == {8} and {r.max_tokens for r in fixed} == {4}
    assert fixed == synthetic_requests(10, 8, 4, seed=1) and fixed != synthetic_requests(10, 8, 4, seed=2)
    assert length_range(1, 0.9) == (1, 1) and length_range(10, 0.25) == (8, 12)
    with pytest.raises(ValueError):
        synthetic_requests(1, 8, 4, range_ratio=1.0)


def test_dataset_lines_cycle_and_bad_lines_name_the_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hello", "max_tokens": 3}\n\n{"prompt": [1, 2, 3]}\n')
    reqs = load_dataset(str(f), 5, default_max_tokens=7, ignore_eos=False)
    assert [(r.prompt, r.max_tokens) for r in reqs] == [("hello", 3), ([1, 2, 3], 7)] * 2 + [("hello", 3)]
    f.write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    with pytest.raises(ValueError, match="d.jsonl:2"):
        load_dataset(str(f), 2, 7, False)


# ---- whole runs against fake servers -------------------------------------------------------------
class FakeGeneration(public_pb2_grpc.GenerationServicer):
    """Streams max_tokens tokens two at a time, `gap` seconds apart; prompt text "fail" is refused."""

    def __init__(self, gap: float) -> None:
        self.gap, self.lock, self.running, self.peak, self.cancelled = gap, threading.Lock(), 0, 0, 0

    def Generate(self, request: public_pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator[public_pb2.GenerateResponse]:
        if request.text == "fail":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room")
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            n = request.params.max_tokens
            for start in range(0, n, 2):
                time.sleep(self.gap)
                if not context.is_active():
                    with self.lock:
                        self.cancelled += 1
                    return
                ids = list(range(start, min(start + 2, n)))
                last = start + 2 >= n
                yield public_pb2.GenerateResponse(request_id="r", token_ids=ids, text="x" * len(ids), finished=last,
                                                  finish_reason="length" if last else "",
                                                  usage=public_pb2.Usage(prompt_tokens=len(request.token_ids.ids), completion_tokens=n))
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def grpc_server() -> Iterator[Callable[[float], tuple[str, FakeGeneration]]]:
    servers = []

    def start(gap: float) -> tuple[str, FakeGeneration]:
        server = grpc.server(futures.ThreadPoolExecutor(16))
        fake = FakeGeneration(gap)
        public_pb2_grpc.add_GenerationServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", fake

    yield start
    for s in servers:
        s.stop(grace=0)


def test_bench_grpc_end_to_end(grpc_server: Callable, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    address, fake = grpc_server(gap=0.01)
    out = tmp_path / "result.json"
    rc = main(["bench", "--backend", "grpc", "--address", address, "--num-prompts", "12", "--input-len", "6", "--output-len", "5",
               "--max-concurrency", "3", "--request-rate", "200", "--slo-ttft", "10000", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    s = result["summary"]
    assert (s["requests"], s["completed"], s["failed"]) == (12, 12, 0)
    assert s["output_tokens"] == 12 * 5 and s["input_tokens"] == 12 * 6
    assert s["goodput"]["good"] == 12 and s["goodput"]["good_fraction"] == 1.0
    assert fake.peak <= 3
    for r in result["requests"]:
        assert r["status"] == "OK" and r["output_tokens"] == 5 and len(r["itl"]) == 3  # chunks of 2, 2, 1: the later two give 2 + 1
        assert 0 < r["ttft"] < r["e2e"] and r["tpot"] > 0
    assert result["config"]["backend"] == "grpc" and result["config"]["max_concurrency"] == 3
    printed = capsys.readouterr()
    assert "Successful requests:" in printed.out and "P99 TTFT (ms):" in printed.out and "12/12 done" in printed.err


def test_bench_grpc_counts_failures_by_status(grpc_server: Callable, tmp_path: Path) -> None:
    address, _ = grpc_server(gap=0.001)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "fail"}\n{"prompt": [1, 2], "max_tokens": 3}\n')
    out = tmp_path / "r.json"
    assert main(["bench", "--address", address, "--dataset", str(data), "--num-prompts", "4", "--output", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]
    assert s["completed"] == 2 and s["failed_by_status"] == {"RESOURCE_EXHAUSTED": 2}
    assert s["first_error_by_status"]["RESOURCE_EXHAUSTED"] == "no room"  # what went wrong, not only how often


def test_bench_ctrl_c_cancels_in_flight_and_still_reports(grpc_server: Callable, tmp_path: Path) -> None:
    address, fake = grpc_server(gap=0.2)  # a 100-token request streams for 10 s
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "quick", "max_tokens": 2}\n{"prompt": "slow", "max_tokens": 100}\n')
    out = tmp_path / "r.json"
    # Python leaves SIGINT ignored when started with it ignored (a background job of a script):
    # restore the handler that raises KeyboardInterrupt, as Ctrl-C in a terminal finds it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t = time.monotonic()
    try:
        rc = main(["bench", "--address", address, "--dataset", str(data), "--num-prompts", "20", "--max-concurrency", "2", "--output", str(out)])
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert rc == 130 and time.monotonic() - t < 5
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["interrupted"] and s["completed"] >= 1 and s["requests"] < 20  # launching stopped
    assert s["failed_by_status"] == {"CANCELLED": 2}  # both slots were held by slow requests
    deadline = time.monotonic() + 2
    while fake.cancelled < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.cancelled == 2 and fake.running == 0


class FakeSSE(BaseHTTPRequestHandler):
    """/v1/completions streaming one token per event; prompt "fail" gets a 429, "midfail" an in-band error."""

    protocol_version = "HTTP/1.1"
    seen_keys: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen_keys.append(self.headers.get("Authorization", ""))
        assert self.path == "/v1/completions" and body["stream"] and body["stream_options"]["include_usage"]
        if body["prompt"] == "fail":
            data = json.dumps({"error": {"message": "busy", "type": "resource_exhausted", "code": 429}}).encode()
            self.send_response(429)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            time.sleep(0.005)
            if body["prompt"] == "midfail" and i == 1:
                self._event({"error": {"message": "worker died", "type": "INTERNAL", "code": 500}})
                break
            self._event({"choices": [{"index": 0, "text": f"t{i}", "finish_reason": "length" if i == n - 1 else None}]})
        else:
            prompt = len(body["prompt"]) if isinstance(body["prompt"], list) else len(body["prompt"].split())
            self._event({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def _event(self, event: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.flush()


def test_bench_http_end_to_end(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSSE)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeSSE.seen_keys = []
    try:
        out = tmp_path / "r.json"
        url = f"http://127.0.0.1:{server.server_address[1]}"
        rc = main(["bench", "--backend", "http", "--url", url, "--api-key", "k", "--num-prompts", "10", "--input-len", "4",
                   "--output-len", "6", "--range-ratio", "0.5", "--request-rate", "100", "--burstiness", "0.5", "--output", str(out)])
        assert rc == 0
        result = json.loads(out.read_text())
        s = result["summary"]
        assert (s["completed"], s["failed"]) == (10, 0) and FakeSSE.seen_keys == ["Bearer k"] * 10
        assert s["output_tokens"] == sum(r["output_tokens"] for r in result["requests"])
        for r in result["requests"]:
            assert 3 <= r["output_tokens"] <= 9 and len(r["itl"]) == r["output_tokens"] - 1 and 0 < r["ttft"] < r["e2e"]
            assert 2 <= r["prompt_tokens"] <= 6

        data = tmp_path / "d.jsonl"
        data.write_text('{"prompt": "fail"}\n{"prompt": "midfail"}\n{"prompt": "a b c", "max_tokens": 4}\n')
        assert main(["bench", "--backend", "http", "--url", url, "--dataset", str(data), "--num-prompts", "3", "--output", str(out)]) == 0
        s = json.loads(out.read_text())["summary"]
        assert s["completed"] == 1 and s["failed_by_status"] == {"INTERNAL": 1, "RESOURCE_EXHAUSTED": 1}
        assert s["input_tokens"] == 3 and s["output_tokens"] == 4
    finally:
        server.shutdown()
        server.server_close()


def test_bench_http_unreachable_server_is_a_counted_failure(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        out = tmp_path / "r.json"
        rc = main(["bench", "--backend", "http", "--url", f"127.0.0.1:{port}", "--num-prompts", "2", "--output", str(out)])
    assert rc == 1
    assert json.loads(out.read_text())["summary"]["failed_by_status"] == {"UNAVAILABLE": 2}
