"""Runs an installed vLLM for `engine_throughput.py --vllm-python PYTHON`, in that Python.

vLLM pins its own torch and friends, so it lives in its own virtual environment and this file
runs there as a separate process: it imports vLLM and the standard library only, never
splitserve. It speaks JSON lines: the first line on stdin says how to build the `LLM`, each next
one is a batch to generate (or "quit"); each answer is one line on the protocol stream. vLLM and
its helper processes log to stdout, so the protocol gets a duplicate of the original stdout and
stdout itself is pointed at stderr before vLLM is imported.

    {"model": DIR, "dtype": "float32", "max_model_len": 4096, "enforce_eager": true, ...}
    {"cmd": "generate", "prompts": [[token ids], ...], "max_tokens": [n, ...]}
    -> {"ok": true, "seconds": s, "outputs": [[token ids], ...]}     (or {"ok": false, "error": "..."})
"""

import json
import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder's modules must not shadow anything vLLM imports


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's logs (and its children's) go to stderr from here on

    def answer(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        spec = json.loads(sys.stdin.readline())
        import vllm
        from vllm import LLM, SamplingParams

        llm = LLM(**spec)
        answer({"ok": True, "version": vllm.__version__})
    except Exception as e:  # noqa: BLE001 -- the parent reports it; nothing to clean up yet
        answer({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("cmd") == "quit":
            break
        try:
            params = [SamplingParams(max_tokens=m, min_tokens=m, temperature=0, ignore_eos=True) for m in job["max_tokens"]]
            prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            answer({"ok": True, "seconds": seconds, "outputs": [list(o.outputs[0].token_ids) for o in outs]})
        except Exception as e:  # noqa: BLE001 -- one failed batch: the parent decides whether to go on
            answer({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
