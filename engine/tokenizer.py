"""Text <-> token ids through a checkpoint's `tokenizer.json` (the `tokenizers` library).

`IncrementalDetokenizer` turns a growing list of output ids into text deltas without
re-decoding everything each step, and holds back bytes that do not yet form a whole
character (byte-level BPE can split a UTF-8 character over two tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from splitserve.engine.errors import CheckpointError


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
        cfg_path = model_dir / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class IncrementalDetokenizer:
    """Feeds output ids one at a time; `text` is everything decoded so far."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # decode window start: a token boundary before `_read`
        self._read = 0  # ids before this are already in `text`
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be empty)."""
        self._ids.append(token_id)
        before = self._tokenizer.decode(self._ids[self._prefix : self._read])
        after = self._tokenizer.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character, or a token that renders as nothing yet
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
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
