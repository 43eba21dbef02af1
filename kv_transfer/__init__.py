"""Moving KV blocks between processes: one sender/receiver contract, several transports.

    layout.py   what two peers must agree on (checked by the handshake)
    state.py    the receiver's transfer table: RESERVED -> RECEIVING -> COMPLETE | FAILED | EXPIRED
    wire.py     tensors <-> bytes, payload checks
    sender.py   the sender interface and the per-destination send queue
    local.py    in-process transport
    grpc_transport.py   gRPC client-streaming transport
    torch_transport.py  torch.distributed point-to-point (gloo on CPU, NCCL on GPU)
"""
