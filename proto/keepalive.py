"""gRPC keepalive for every channel and server of splitserve: workers, routers, the SDK.

A peer that stops answering while its connection stays up (a hung or SIGSTOPped process, a
wedged host: its kernel still acknowledges TCP) is found by HTTP/2 pings. A ping goes out after
KEEPALIVE_MS without one; a connection whose ping has no answer within KEEPALIVE_TIMEOUT_MS is
closed and its calls fail UNAVAILABLE, which the router retries elsewhere where the request
allows it (without pings they waited for the request's whole deadline, 600 s by default). Pings
are answered by gRPC's own threads, not Python's, so a busy process still answers.

Channels send the pings; servers accept them this often (by default they answer more than one
per 5 minutes on a call without data with GOAWAY) and send none themselves; gRPC waits for a ping's answer the longer of keepalive_timeout_ms
and ping_timeout_ms (60 s by default), so both are set. Only grpcio is needed here: the SDK
uses this module too.
"""

from __future__ import annotations

KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS = 5_000, 10_000
# for channels: they ping the servers they call (only they need to: the caller is the one waiting)
KEEPALIVE = [
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),  # a call that only receives (a token stream) is pinged throughout
]
# for servers: they accept those pings
ACCEPT_PINGS = [("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2), ("grpc.http2.max_ping_strikes", 0)]
