"""The decode process: reservations under leases, KV reception, continuous-batching decode."""
