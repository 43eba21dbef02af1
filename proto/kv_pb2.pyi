from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayout(_message.Message):
    __slots__ = ("model_fingerprint", "dtype", "block_size", "layout", "num_layers", "num_kv_heads", "head_dim", "protocol_version")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    dtype: str
    block_size: int
    layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    protocol_version: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., layout: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("sender_id", "layout", "transport")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    layout: KVLayout
    transport: str
    def __init__(self, sender_id: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., transport: _Optional[str] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("receiver_id", "store_address", "pair_key")
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PAIR_KEY_FIELD_NUMBER: _ClassVar[int]
    receiver_id: str
    store_address: str
    pair_key: str
    def __init__(self, receiver_id: _Optional[str] = ..., store_address: _Optional[str] = ..., pair_key: _Optional[str] = ...) -> None: ...

class KVPayload(_message.Message):
    __slots__ = ("request_id", "layer", "block_ids", "dtype", "shape", "byte_length", "data", "secret")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layer: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_length: int
    data: bytes
    secret: str
    def __init__(self, request_id: _Optional[str] = ..., layer: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., byte_length: _Optional[int] = ..., data: _Optional[bytes] = ..., secret: _Optional[str] = ...) -> None: ...

class KVCommit(_message.Message):
    __slots__ = ("request_id", "first_token", "first_logprob", "num_tokens", "secret", "top_token_ids", "top_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token: int
    first_logprob: float
    num_tokens: int
    secret: str
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request_id: _Optional[str] = ..., first_token: _Optional[int] = ..., first_logprob: _Optional[float] = ..., num_tokens: _Optional[int] = ..., secret: _Optional[str] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class KVAbort(_message.Message):
    __slots__ = ("request_id", "reason", "secret")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    secret: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ..., secret: _Optional[str] = ...) -> None: ...

class KVTouch(_message.Message):
    __slots__ = ("request_id", "secret")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    secret: str
    def __init__(self, request_id: _Optional[str] = ..., secret: _Optional[str] = ...) -> None: ...

class KVMessage(_message.Message):
    __slots__ = ("handshake", "payload", "commit", "abort", "touch")
    HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    TOUCH_FIELD_NUMBER: _ClassVar[int]
    handshake: HandshakeRequest
    payload: KVPayload
    commit: KVCommit
    abort: KVAbort
    touch: KVTouch
    def __init__(self, handshake: _Optional[_Union[HandshakeRequest, _Mapping]] = ..., payload: _Optional[_Union[KVPayload, _Mapping]] = ..., commit: _Optional[_Union[KVCommit, _Mapping]] = ..., abort: _Optional[_Union[KVAbort, _Mapping]] = ..., touch: _Optional[_Union[KVTouch, _Mapping]] = ...) -> None: ...

class PushResult(_message.Message):
    __slots__ = ("payloads", "bytes")
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    payloads: int
    bytes: int
    def __init__(self, payloads: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...
