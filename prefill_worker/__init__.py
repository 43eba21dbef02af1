"""The prefill process: prefill-only scheduling, pushing KV to decode workers, first tokens."""
