"""The two halves disaggregation needs, inside one process: prefill-only on one engine,
decode-from-KV on another, compared with one engine doing both."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.engine import LLM, KVCapacityError, LLMEngine, SamplingParams, UnknownRequestError
from splitserve.engine.config import EngineConfig

PROMPTS = [[3 + (i * 7 + j * 11) % 480 for j in range(n)] for i, n in enumerate([1, 15, 16, 17, 90, 250])]


def engine(llama_dir: Path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(llama_dir), dtype="float32", **kw))


def run_disaggregated(prefill: LLMEngine, decode: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    prefill.add_request(rid, prompt, params, prefill_only=True)
    layers_done: list[int] = []
    prefill.on_layer_done = lambda layer, scheduled: layers_done.append(layer)
    first = None
    while first is None:
        first = next((o for o in prefill.step() if o.request_id == rid and o.finished), None)
    prefill.on_layer_done = None
    assert first.finish_reason == "prefill_done" and len(first.token_ids) == 1
    assert layers_done[-prefill.model_config.num_layers :] == list(range(prefill.model_config.num_layers))

    reservation = decode.reserve(rid, prompt, params.max_tokens)
    k = reservation.num_cached_blocks  # the decode side's cached prefix: not written again
    for layer in range(prefill.model_config.num_layers):
        decode.write_kv(layer, reservation.block_ids[k:], prefill.read_kv(layer, first.kv_block_ids[k:]))
    prefill.release(rid)

    out = decode.admit_prefilled(rid, prompt, first.token_ids[0], params, first.logprobs[0])
    while not out.finished:
        out = next(o for o in decode.step() if o.request_id == rid)
    return out.token_ids


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=77, max_tokens=20, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_prefill_here_decode_there_equals_one_engine(llama_dir: Path, params: SamplingParams) -> None:
    single = LLM(str(llama_dir), dtype="float32")
    expected = [o.token_ids for o in single.generate(PROMPTS, params)]
    # different block sizes on purpose would be refused by a real handshake; here equal ones
    prefill, decode = engine(llama_dir), engine(llama_dir)
    for i, prompt in enumerate(PROMPTS):
        assert run_disaggregated(prefill, decode, f"r{i}", prompt, params) == expected[i]
    for e in (prefill, decode):
        assert e.pool.num_free == e.pool.num_blocks and e.stats()["reserved_blocks"] == 0


def test_decode_side_batches_admitted_requests_with_local_ones(llama_dir: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    single = LLM(str(llama_dir), dtype="float32")
    expected = [o.token_ids for o in single.generate(PROMPTS[:3], params)]
    prefill, decode = engine(llama_dir), engine(llama_dir)
    decode.add_request("local", PROMPTS[3], params)
    decode.step()
    assert run_disaggregated(prefill, decode, "remote", PROMPTS[0], params) == expected[0]


def test_first_token_can_finish_the_request(llama_dir: Path) -> None:
    decode = engine(llama_dir)
    blocks = decode.reserve("r", [5, 6, 7, 8], 1).block_ids
    out = decode.admit_prefilled("r", [5, 6, 7, 8], 42, SamplingParams(max_tokens=1))
    assert out.finished and out.finish_reason == "length" and out.token_ids == [42]
    assert len(blocks) == 1 and decode.pool.num_free == decode.pool.num_blocks


def test_reservations_are_accounted_and_abortable(llama_dir: Path) -> None:
    decode = engine(llama_dir, num_kv_blocks=8, block_size=16)
    decode.reserve("a", [1] * 100, 10)  # 7 blocks
    assert decode.stats()["reserved_blocks"] == 7
    with pytest.raises(KVCapacityError):
        decode.reserve("b", [2] * 40, 10)
    decode.abort_request("a")
    assert decode.stats()["reserved_blocks"] == 0 and decode.pool.num_free == 8
    with pytest.raises(UnknownRequestError):
        decode.admit_prefilled("a", [1] * 100, 3, SamplingParams())
    with pytest.raises(UnknownRequestError):
        decode.abort_request("a")


def test_release_of_unknown_prefill_is_an_error(llama_dir: Path) -> None:
    with pytest.raises(UnknownRequestError):
        engine(llama_dir).release("nope")


def test_decode_side_prefix_hits_move_only_the_missing_blocks(llama_dir: Path) -> None:
    """Turn 2 of a conversation: the decode engine still caches turn 1 (prompt and reply), so
    only the new turn's blocks are written; the tokens equal one engine's."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    single = LLM(str(llama_dir), dtype="float32")
    turn1 = PROMPTS[5]  # 250 tokens
    prefill, decode = engine(llama_dir), engine(llama_dir)
    reply = run_disaggregated(prefill, decode, "t1", turn1, params)
    assert reply == single.generate([turn1], params)[0].token_ids
    turn2 = turn1 + reply + [7, 8, 9] * 10
    reservation = decode.reserve("probe", turn2, params.max_tokens)
    assert reservation.num_cached_blocks == (len(turn1) + len(reply) - 1) // 16  # every full block of turn 1 that was decoded
    decode.abort_request("probe")
    assert run_disaggregated(prefill, decode, "t2", turn2, params) == single.generate([turn2], params)[0].token_ids
    assert decode.stats()["reserved_blocks"] == 0 and decode.pool.num_free == decode.pool.num_blocks
