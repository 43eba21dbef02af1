"""Run a prefill worker process: `python -m splitserve.prefill_worker --model DIR [--port 0] ...`
(`--help` lists every flag; `--redis-url URL --cluster NAME` joins a running cluster)."""

from splitserve.cluster.worker_runtime import main

if __name__ == "__main__":
    main("prefill")
