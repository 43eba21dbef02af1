"""Long prompts are tokenized (and long chats rendered) off the router's event loop, and the
tokenizer lets other threads run meanwhile: a few MB of text take it seconds, which on the
loop stalled every other request and the health checks (5-11 s for 7 MB)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from splitserve.engine.tokenizer import LONG_TEXT_CHARS, Tokenizer
from splitserve.router.http_api import LONG_CHAT_MESSAGES, OpenAIFrontend
from splitserve.router.openai_protocol import ChatCompletionRequest
from splitserve.router.orchestrator import Orchestrator

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


class Recording(Tokenizer):
    """The checkpoint's tokenizer, noting the thread of each encode."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.get_ident())
        return super().encode(text, add_special_tokens)


def test_the_tokenizer_lets_other_threads_run_while_it_encodes_long_text(llama_dir: Path) -> None:
    tok = Tokenizer(llama_dir)
    text = "splitserve moves KV, " * 100_000  # 2 MB: about a second of encoding
    assert tok.encode(text[:LONG_TEXT_CHARS + 7]) == tok._tok.encode(text[:LONG_TEXT_CHARS + 7]).ids  # the same ids either way
    worker = threading.Thread(target=tok.encode, args=(text,))
    turns = 0
    worker.start()
    while worker.is_alive():  # while encode held the GIL, this thread got no turn until it returned
        turns += 1
        time.sleep(0.001)
    assert turns > 10, turns


def test_long_prompts_and_chats_are_encoded_off_the_event_loop(llama_dir: Path) -> None:
    tok = Recording(llama_dir)
    orch = SimpleNamespace(tokenizer=tok, model_config=SimpleNamespace(vocab_size=tok.vocab_size), context_limit=lambda: 4096)
    orch.encoded = lambda prompt: Orchestrator.encoded(orch, prompt)
    frontend = OpenAIFrontend(orch, TEMPLATE, {})
    many = [{"role": "user", "content": "hi"}] * (LONG_CHAT_MESSAGES + 1)

    async def run() -> tuple[int, list]:
        short = await orch.encoded("a short prompt")
        long = await orch.encoded("x" * (LONG_TEXT_CHARS + 1))
        await frontend.chat_plan(ChatCompletionRequest(messages=many[:2], max_tokens=4))
        await frontend.chat_plan(ChatCompletionRequest(messages=many, max_tokens=4))
        return threading.get_ident(), [short, long]

    loop_thread, (short, long) = asyncio.run(run())
    assert short == "a short prompt" and long == tok._tok.encode("x" * (LONG_TEXT_CHARS + 1)).ids  # short ones are left to validate
    on_loop = [t == loop_thread for t in tok.threads]
    assert on_loop == [False, True, False], on_loop  # the long prompt, the short chat, the long chat
