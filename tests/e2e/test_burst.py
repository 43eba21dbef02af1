"""A burst of clients arriving at the same moment is queued and served, not reset."""

from __future__ import annotations

import asyncio
import json

import httpx

CLIENTS = 256


async def one_stream(client: httpx.AsyncClient, url: str, i: int, go: asyncio.Event) -> str:
    await go.wait()
    body = {"prompt": f"burst {i}", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
    text, done = [], False
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += [c["text"] for c in event["choices"]]
    assert done
    return "".join(text)


async def burst(url: str) -> list[str | BaseException]:
    go = asyncio.Event()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(180.0)) as client:
        tasks = [asyncio.create_task(one_stream(client, url, i, go)) for i in range(CLIENTS)]
        await asyncio.sleep(0.1)
        go.set()  # every client connects at once
        return await asyncio.gather(*tasks, return_exceptions=True)


def test_256_streams_opened_at_once_all_complete(make_cluster) -> None:
    c = make_cluster().start(("prefill", []), ("decode", []))
    results = asyncio.run(burst(c.http + "/v1/completions"))
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} of {CLIENTS} failed, e.g. {failed[:3]}"
    assert all(isinstance(r, str) for r in results)
    c.assert_idle()
