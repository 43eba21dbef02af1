"""Cluster management: pools on Ray, registry in Redis, and the `splitserve` CLI."""
