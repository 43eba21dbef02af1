"""The public front door: request orchestration over prefill and decode workers."""
