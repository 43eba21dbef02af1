"""Text <-> token ids through a checkpoint's `tokenizer.json` (the `tokenizers` library).

`IncrementalDetokenizer` turns a growing list of output ids into text deltas without
re-decoding everything each step (the library's DecodeStream), and holds back bytes that do
not yet form a whole character (byte-level BPE can split a UTF-8 character over two tokens).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from splitserve.engine.errors import CheckpointError

# Text longer than this takes milliseconds to seconds to encode (a few MB: seconds): the router
# encodes it on a worker thread, and the tokenizer then lets the event loop's thread run.
LONG_TEXT_CHARS = 16_384
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback: one raw byte


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte is one printable character in a token's
    piece (printable Latin-1 bytes stand for themselves, the others for code points from 256)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


BYTE_LEVEL_CHARS = _byte_level_chars()


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError("tokenizer.json", f"not found in {model_dir}")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on a bad file
            raise CheckpointError("tokenizer.json", f"cannot be loaded: {e}") from e
        self.config: dict[str, Any] = _read_json(model_dir / "tokenizer_config.json")
        self.special_ids = self._special_ids(model_dir)

    def _special_ids(self, model_dir: Path) -> frozenset[int]:
        """Ids that are not text: tokens the tokenizer marks special, and the BOS / EOS / pad /
        unk tokens named by tokenizer_config.json, special_tokens_map.json, config.json or
        generation_config.json (checkpoints disagree about where, and some leave EOS unmarked)."""
        ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        for source in (self.config, _read_json(model_dir / "special_tokens_map.json")):
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                token = source.get(key)
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str) and (i := self._tok.token_to_id(token)) is not None:
                    ids.add(i)
        for source in (_read_json(model_dir / "config.json"), _read_json(model_dir / "generation_config.json")):
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = source.get(key)
                ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int) and not isinstance(v, bool))
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:  # the batch call lets other threads run meanwhile (encode holds the GIL throughout)
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (OpenAI's logprob `bytes`, whose concatenation rebuilds the
        text): its text in UTF-8, or, for a token holding part of a character (its text alone is
        U+FFFD), the raw bytes of its piece under byte-level BPE or byte fallback."""
        text = self.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode()
        piece = self._tok.id_to_token(token_id) or ""
        if m := BYTE_PIECE.fullmatch(piece):
            return bytes([int(m[1], 16)])
        if piece and all(c in BYTE_LEVEL_CHARS for c in piece):
            return bytes(BYTE_LEVEL_CHARS[c] for c in piece)
        return text.encode()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (see `special_ids`) are left out unless asked for."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def hf(self) -> HFTokenizer:
        """The `tokenizers` library's tokenizer underneath."""
        return self._tok


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(path.name, f"is not valid JSON: {e}") from e
    return value if isinstance(value, dict) else {}


class IncrementalDetokenizer:
    """Feeds output ids one at a time; `text` is everything decoded so far. Special tokens add
    no text unless `skip_special_tokens` is False (then they show, e.g. `</s>`). The decoding
    is the `tokenizers` library's own streaming decoder, which holds back the bytes of a
    character split over two tokens (byte-level BPE does that) until it is whole."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer.hf
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._stream = DecodeStream(skip_special_tokens=False)  # the skipping is ours, by id
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be empty)."""
        if token_id in self._skip:
            return ""
        delta = self._stream.step(self._tok, token_id) or ""
        self.text += delta
        return delta


def cut_at_stop_string(text: str, delta_len: int, stops: tuple[str, ...]) -> str | None:
    """If a stop string ends inside the last `delta_len` characters of `text`, the text before
    it; else None. The same rule serves the engine and the router, so both cut alike."""
    for stop in stops:
        idx = text.find(stop, max(0, len(text) - delta_len - len(stop) + 1))
        if idx >= 0:
            return text[:idx]
    return None
