"""SamplingParams holds every value to what the wire carries (int32 counts and token ids, an int64
seed, finite float32 temperature and top_p) and bounds the per-token work of stop conditions, and
says which field is wrong."""

from __future__ import annotations

import pytest

from splitserve.engine import InvalidRequestError, SamplingParams
from splitserve.engine.sampling_params import INT32_MAX, INT64_MAX, INT64_MIN, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from splitserve.proto.convert import params_from_proto, params_to_proto


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": INT32_MAX + 1}, "max_tokens"),
    ({"top_k": 2**40}, "top_k"),
    ({"seed": INT64_MAX + 1}, "seed"),
    ({"seed": 10**30}, "seed"),
    ({"seed": INT64_MIN - 1}, "seed"),
    ({"stop_token_ids": [INT32_MAX + 1]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, "stop"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e39}, "temperature"),
    ({"top_p": 1e-45}, "top_p"),
    ({"top_p": True}, "top_p"),
    ({"logit_bias": {2**40: 1.0}}, "logit_bias"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
])
def test_values_beyond_the_wire_name_their_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and len(str(e.value)) < 200


def test_the_extremes_the_wire_carries_round_trip() -> None:
    p = SamplingParams(max_tokens=INT32_MAX, top_k=INT32_MAX, seed=INT64_MIN, stop_token_ids=[0, INT32_MAX] * (MAX_STOP_TOKEN_IDS // 2),
                       stop=["s" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS, temperature=3.0e38, top_p=1.2e-38)
    back = params_from_proto(params_to_proto(p))
    assert (back.max_tokens, back.top_k, back.seed, back.stop, back.stop_token_ids) == (p.max_tokens, p.top_k, p.seed, p.stop, p.stop_token_ids)
    assert back.top_p > 0 and back.temperature > 0
    assert params_from_proto(params_to_proto(SamplingParams(seed=INT64_MAX))).seed == INT64_MAX
