from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdmissionPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADMISSION_UNSPECIFIED: _ClassVar[AdmissionPolicy]
    ADMISSION_SECRET: _ClassVar[AdmissionPolicy]
    ADMISSION_OPEN: _ClassVar[AdmissionPolicy]

class NodeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_KIND_UNSPECIFIED: _ClassVar[NodeKind]
    NODE_KIND_SERVING: _ClassVar[NodeKind]
    NODE_KIND_CLIENT: _ClassVar[NodeKind]

class ModelRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_ROLE_UNSPECIFIED: _ClassVar[ModelRole]
    MODEL_ROLE_ON_DISK: _ClassVar[ModelRole]
    MODEL_ROLE_HOST: _ClassVar[ModelRole]
    MODEL_ROLE_STAGE: _ClassVar[ModelRole]
    MODEL_ROLE_STANDBY: _ClassVar[ModelRole]

class StageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_KIND_UNSPECIFIED: _ClassVar[StageKind]
    STAGE_KIND_PREFILL: _ClassVar[StageKind]
    STAGE_KIND_DECODE: _ClassVar[StageKind]
    STAGE_KIND_RESULT: _ClassVar[StageKind]
    STAGE_KIND_ERROR: _ClassVar[StageKind]
    STAGE_KIND_CANCEL: _ClassVar[StageKind]
    STAGE_KIND_OPEN: _ClassVar[StageKind]
    STAGE_KIND_CLOSE: _ClassVar[StageKind]
    STAGE_KIND_ASSIGN: _ClassVar[StageKind]
    STAGE_KIND_READY: _ClassVar[StageKind]
    STAGE_KIND_TRUNCATE: _ClassVar[StageKind]
    STAGE_KIND_EXPERT_ASSIGN: _ClassVar[StageKind]
    STAGE_KIND_EXPERT_RUN: _ClassVar[StageKind]
    STAGE_KIND_EXPERT_RESULT: _ClassVar[StageKind]
    STAGE_KIND_VERIFY: _ClassVar[StageKind]
    STAGE_KIND_VALIDATION_ASK: _ClassVar[StageKind]
    STAGE_KIND_EXPERT_RECEIPT: _ClassVar[StageKind]
ADMISSION_UNSPECIFIED: AdmissionPolicy
ADMISSION_SECRET: AdmissionPolicy
ADMISSION_OPEN: AdmissionPolicy
NODE_KIND_UNSPECIFIED: NodeKind
NODE_KIND_SERVING: NodeKind
NODE_KIND_CLIENT: NodeKind
MODEL_ROLE_UNSPECIFIED: ModelRole
MODEL_ROLE_ON_DISK: ModelRole
MODEL_ROLE_HOST: ModelRole
MODEL_ROLE_STAGE: ModelRole
MODEL_ROLE_STANDBY: ModelRole
STAGE_KIND_UNSPECIFIED: StageKind
STAGE_KIND_PREFILL: StageKind
STAGE_KIND_DECODE: StageKind
STAGE_KIND_RESULT: StageKind
STAGE_KIND_ERROR: StageKind
STAGE_KIND_CANCEL: StageKind
STAGE_KIND_OPEN: StageKind
STAGE_KIND_CLOSE: StageKind
STAGE_KIND_ASSIGN: StageKind
STAGE_KIND_READY: StageKind
STAGE_KIND_TRUNCATE: StageKind
STAGE_KIND_EXPERT_ASSIGN: StageKind
STAGE_KIND_EXPERT_RUN: StageKind
STAGE_KIND_EXPERT_RESULT: StageKind
STAGE_KIND_VERIFY: StageKind
STAGE_KIND_VALIDATION_ASK: StageKind
STAGE_KIND_EXPERT_RECEIPT: StageKind

class Frame(_message.Message):
    __slots__ = ("gen", "hello", "welcome", "reject", "gossip", "ping", "pong", "peer_down", "peer_leaving", "stage", "http", "echo")
    GEN_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    PEER_DOWN_FIELD_NUMBER: _ClassVar[int]
    PEER_LEAVING_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    HTTP_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    gen: int
    hello: Hello
    welcome: Welcome
    reject: Reject
    gossip: Gossip
    ping: Ping
    pong: Pong
    peer_down: PeerDown
    peer_leaving: PeerLeaving
    stage: StageFrame
    http: HttpTunnelFrame
    echo: Echo
    def __init__(self, gen: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., reject: _Optional[_Union[Reject, _Mapping]] = ..., gossip: _Optional[_Union[Gossip, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., peer_down: _Optional[_Union[PeerDown, _Mapping]] = ..., peer_leaving: _Optional[_Union[PeerLeaving, _Mapping]] = ..., stage: _Optional[_Union[StageFrame, _Mapping]] = ..., http: _Optional[_Union[HttpTunnelFrame, _Mapping]] = ..., echo: _Optional[_Union[Echo, _Mapping]] = ...) -> None: ...

class InviteCredential(_message.Message):
    __slots__ = ("expires_at", "nonce", "mac", "issuer", "single_use")
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SINGLE_USE_FIELD_NUMBER: _ClassVar[int]
    expires_at: int
    nonce: bytes
    mac: bytes
    issuer: bytes
    single_use: bool
    def __init__(self, expires_at: _Optional[int] = ..., nonce: _Optional[bytes] = ..., mac: _Optional[bytes] = ..., issuer: _Optional[bytes] = ..., single_use: _Optional[bool] = ...) -> None: ...

class InviteToken(_message.Message):
    __slots__ = ("version", "mesh_id", "node_id", "addrs", "relay_url", "policy", "credential")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESH_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    RELAY_URL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    version: int
    mesh_id: str
    node_id: bytes
    addrs: _containers.RepeatedScalarFieldContainer[str]
    relay_url: str
    policy: AdmissionPolicy
    credential: InviteCredential
    def __init__(self, version: _Optional[int] = ..., mesh_id: _Optional[str] = ..., node_id: _Optional[bytes] = ..., addrs: _Optional[_Iterable[str]] = ..., relay_url: _Optional[str] = ..., policy: _Optional[_Union[AdmissionPolicy, str]] = ..., credential: _Optional[_Union[InviteCredential, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("mesh_id", "announcement", "invite", "member_proof", "want_secret", "software_version", "protocol_version")
    MESH_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    INVITE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_PROOF_FIELD_NUMBER: _ClassVar[int]
    WANT_SECRET_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    mesh_id: str
    announcement: SignedAnnouncement
    invite: InviteCredential
    member_proof: bytes
    want_secret: bool
    software_version: str
    protocol_version: int
    def __init__(self, mesh_id: _Optional[str] = ..., announcement: _Optional[_Union[SignedAnnouncement, _Mapping]] = ..., invite: _Optional[_Union[InviteCredential, _Mapping]] = ..., member_proof: _Optional[bytes] = ..., want_secret: _Optional[bool] = ..., software_version: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("mesh_id", "policy", "mesh_secret", "member_proof", "announcements", "protocol_version")
    MESH_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MESH_SECRET_FIELD_NUMBER: _ClassVar[int]
    MEMBER_PROOF_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCEMENTS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    mesh_id: str
    policy: AdmissionPolicy
    mesh_secret: bytes
    member_proof: bytes
    announcements: _containers.RepeatedCompositeFieldContainer[SignedAnnouncement]
    protocol_version: int
    def __init__(self, mesh_id: _Optional[str] = ..., policy: _Optional[_Union[AdmissionPolicy, str]] = ..., mesh_secret: _Optional[bytes] = ..., member_proof: _Optional[bytes] = ..., announcements: _Optional[_Iterable[_Union[SignedAnnouncement, _Mapping]]] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class Reject(_message.Message):
    __slots__ = ("reason", "code", "protocol_version")
    REASON_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    reason: str
    code: str
    protocol_version: int
    def __init__(self, reason: _Optional[str] = ..., code: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("device_kind", "vram_bytes", "ram_bytes", "mem_bandwidth_gbps", "compute_tflops", "gpu_name", "gpu_count", "cpu_cores")
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    device_kind: str
    vram_bytes: int
    ram_bytes: int
    mem_bandwidth_gbps: float
    compute_tflops: float
    gpu_name: str
    gpu_count: int
    cpu_cores: int
    def __init__(self, device_kind: _Optional[str] = ..., vram_bytes: _Optional[int] = ..., ram_bytes: _Optional[int] = ..., mem_bandwidth_gbps: _Optional[float] = ..., compute_tflops: _Optional[float] = ..., gpu_name: _Optional[str] = ..., gpu_count: _Optional[int] = ..., cpu_cores: _Optional[int] = ...) -> None: ...

class MoEInfo(_message.Message):
    __slots__ = ("is_moe", "expert_count", "experts_used")
    IS_MOE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_USED_FIELD_NUMBER: _ClassVar[int]
    is_moe: bool
    expert_count: int
    experts_used: int
    def __init__(self, is_moe: _Optional[bool] = ..., expert_count: _Optional[int] = ..., experts_used: _Optional[int] = ...) -> None: ...

class ModelEntry(_message.Message):
    __slots__ = ("model_id", "content_hash", "role", "n_layers", "size_bytes", "architecture", "moe", "layer_start", "layer_end", "plan_epoch", "context_length", "quant", "ready")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MOE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    content_hash: str
    role: ModelRole
    n_layers: int
    size_bytes: int
    architecture: str
    moe: MoEInfo
    layer_start: int
    layer_end: int
    plan_epoch: int
    context_length: int
    quant: str
    ready: bool
    def __init__(self, model_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., role: _Optional[_Union[ModelRole, str]] = ..., n_layers: _Optional[int] = ..., size_bytes: _Optional[int] = ..., architecture: _Optional[str] = ..., moe: _Optional[_Union[MoEInfo, _Mapping]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., plan_epoch: _Optional[int] = ..., context_length: _Optional[int] = ..., quant: _Optional[str] = ..., ready: _Optional[bool] = ...) -> None: ...

class DemandEntry(_message.Message):
    __slots__ = ("model_id", "last_active_ms", "request_count")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    last_active_ms: int
    request_count: int
    def __init__(self, model_id: _Optional[str] = ..., last_active_ms: _Optional[int] = ..., request_count: _Optional[int] = ...) -> None: ...

class PeerRtt(_message.Message):
    __slots__ = ("node_id", "rtt_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: bytes
    rtt_ms: float
    def __init__(self, node_id: _Optional[bytes] = ..., rtt_ms: _Optional[float] = ...) -> None: ...

class PeerAnnouncement(_message.Message):
    __slots__ = ("node_id", "seq", "issued_at_ms", "boot_id", "mesh_id", "kind", "version", "api_port", "console_port", "addrs", "relay_url", "hardware", "models", "demand", "rtts", "protocol_gen", "leaving", "name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    MESH_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_PORT_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_PORT_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    RELAY_URL_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEMAND_FIELD_NUMBER: _ClassVar[int]
    RTTS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_GEN_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    node_id: bytes
    seq: int
    issued_at_ms: int
    boot_id: int
    mesh_id: str
    kind: NodeKind
    version: str
    api_port: int
    console_port: int
    addrs: _containers.RepeatedScalarFieldContainer[str]
    relay_url: str
    hardware: Hardware
    models: _containers.RepeatedCompositeFieldContainer[ModelEntry]
    demand: _containers.RepeatedCompositeFieldContainer[DemandEntry]
    rtts: _containers.RepeatedCompositeFieldContainer[PeerRtt]
    protocol_gen: int
    leaving: bool
    name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, node_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., issued_at_ms: _Optional[int] = ..., boot_id: _Optional[int] = ..., mesh_id: _Optional[str] = ..., kind: _Optional[_Union[NodeKind, str]] = ..., version: _Optional[str] = ..., api_port: _Optional[int] = ..., console_port: _Optional[int] = ..., addrs: _Optional[_Iterable[str]] = ..., relay_url: _Optional[str] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelEntry, _Mapping]]] = ..., demand: _Optional[_Iterable[_Union[DemandEntry, _Mapping]]] = ..., rtts: _Optional[_Iterable[_Union[PeerRtt, _Mapping]]] = ..., protocol_gen: _Optional[int] = ..., leaving: _Optional[bool] = ..., name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SignedAnnouncement(_message.Message):
    __slots__ = ("announcement", "signature")
    ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    announcement: bytes
    signature: bytes
    def __init__(self, announcement: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Gossip(_message.Message):
    __slots__ = ("sender_id", "announcements", "reply")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCEMENTS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    sender_id: bytes
    announcements: _containers.RepeatedCompositeFieldContainer[SignedAnnouncement]
    reply: bool
    def __init__(self, sender_id: _Optional[bytes] = ..., announcements: _Optional[_Iterable[_Union[SignedAnnouncement, _Mapping]]] = ..., reply: _Optional[bool] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce", "sent_at_us", "sender_id")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    sent_at_us: int
    sender_id: bytes
    def __init__(self, nonce: _Optional[int] = ..., sent_at_us: _Optional[int] = ..., sender_id: _Optional[bytes] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce", "sent_at_us", "boot_id")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    sent_at_us: int
    boot_id: int
    def __init__(self, nonce: _Optional[int] = ..., sent_at_us: _Optional[int] = ..., boot_id: _Optional[int] = ...) -> None: ...

class PeerDown(_message.Message):
    __slots__ = ("peer_id", "reporter_id", "boot_id")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTER_ID_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: bytes
    reporter_id: bytes
    boot_id: int
    def __init__(self, peer_id: _Optional[bytes] = ..., reporter_id: _Optional[bytes] = ..., boot_id: _Optional[int] = ...) -> None: ...

class PeerLeaving(_message.Message):
    __slots__ = ("peer_id", "final_announcement")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    FINAL_ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    peer_id: bytes
    final_announcement: SignedAnnouncement
    def __init__(self, peer_id: _Optional[bytes] = ..., final_announcement: _Optional[_Union[SignedAnnouncement, _Mapping]] = ...) -> None: ...

class StageFrame(_message.Message):
    __slots__ = ("request_id", "plan_epoch", "kind", "model_id", "content_hash", "layer_start", "layer_end", "position", "tokens", "dtype", "shape", "activations", "input_hash", "output_hash", "activation_hashes", "error", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_HASH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_HASH_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_HASHES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    plan_epoch: int
    kind: StageKind
    model_id: str
    content_hash: str
    layer_start: int
    layer_end: int
    position: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    activations: bytes
    input_hash: bytes
    output_hash: bytes
    activation_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    error: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., plan_epoch: _Optional[int] = ..., kind: _Optional[_Union[StageKind, str]] = ..., model_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., position: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., activations: _Optional[bytes] = ..., input_hash: _Optional[bytes] = ..., output_hash: _Optional[bytes] = ..., activation_hashes: _Optional[_Iterable[bytes]] = ..., error: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class HttpTunnelFrame(_message.Message):
    __slots__ = ("request_id", "method", "path", "headers", "body", "end", "status")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    method: str
    path: str
    headers: _containers.ScalarMap[str, str]
    body: bytes
    end: bool
    status: int
    def __init__(self, request_id: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., body: _Optional[bytes] = ..., end: _Optional[bool] = ..., status: _Optional[int] = ...) -> None: ...

class Echo(_message.Message):
    __slots__ = ("payload", "sent_at_us", "discard")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    DISCARD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    sent_at_us: int
    discard: bool
    def __init__(self, payload: _Optional[bytes] = ..., sent_at_us: _Optional[int] = ..., discard: _Optional[bool] = ...) -> None: ...
