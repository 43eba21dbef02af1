"""The SDK's own checks, before anything is sent: input mistakes name the keyword, a closed
client says so, and a call's own deadline is honoured."""

from __future__ import annotations

import asyncio

import pytest

from splitserve import AsyncClient, Client, ClientClosedError, InvalidArgumentError
from splitserve.proto.client import _request


@pytest.mark.parametrize("kwargs, named", [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 on the wire is "the default": it generated 16 tokens
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"temperature": "hot"}, "temperature"),
    ({"seed": 2**70}, "seed"),
])
def test_a_bad_option_names_its_keyword(kwargs: dict, named: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        _request("hi", **kwargs)
    assert str(e.value).startswith(f"{named}: "), str(e.value)


@pytest.mark.parametrize("prompt", [None, b"hi", 5, ["a", "b"]])
def test_a_prompt_that_is_neither_text_nor_token_ids_is_refused(prompt) -> None:
    with pytest.raises(InvalidArgumentError, match="^prompt: "):
        _request(prompt)


def test_one_stop_string_is_one_stop_sequence() -> None:
    """A string was split into its characters: stop="tx" stopped at the first t or x."""
    assert list(_request("hi", stop="tx").params.stop) == ["tx"]
    assert list(_request("hi", stop=["tx", "y"]).params.stop) == ["tx", "y"]


def test_a_closed_client_says_so() -> None:
    c = Client("127.0.0.1:1")
    c.close()
    with pytest.raises(ClientClosedError, match="closed"):
        c.generate("hi")
    with pytest.raises(ClientClosedError):
        c.status()

    async def run() -> None:
        a = AsyncClient("127.0.0.1:1")
        await a.close()
        with pytest.raises(ClientClosedError):
            await a.generate("hi")

    asyncio.run(run())


def test_a_zero_timeout_is_the_calls_own_not_the_default() -> None:
    with Client("127.0.0.1:1", timeout=600) as c:
        assert c._deadline(0) == 0 and c._deadline(None) == 600 and c._deadline(2.5) == 2.5
