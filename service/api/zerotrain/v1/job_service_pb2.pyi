import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Algorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALGORITHM_UNSPECIFIED: _ClassVar[Algorithm]
    ALGORITHM_ADAMAX: _ClassVar[Algorithm]
    ALGORITHM_NADAM: _ClassVar[Algorithm]

class Engine(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENGINE_UNSPECIFIED: _ClassVar[Engine]
    ENGINE_NATIVE: _ClassVar[Engine]
    ENGINE_DEEPSPEED: _ClassVar[Engine]

class GradSync(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRAD_SYNC_UNSPECIFIED: _ClassVar[GradSync]
    GRAD_SYNC_ALL_REDUCE: _ClassVar[GradSync]
    GRAD_SYNC_REDUCE_SCATTER: _ClassVar[GradSync]
    GRAD_SYNC_AUTO: _ClassVar[GradSync]

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PLACEMENT_PACK: _ClassVar[Placement]
    PLACEMENT_SPREAD: _ClassVar[Placement]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLING: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
ALGORITHM_UNSPECIFIED: Algorithm
ALGORITHM_ADAMAX: Algorithm
ALGORITHM_NADAM: Algorithm
ENGINE_UNSPECIFIED: Engine
ENGINE_NATIVE: Engine
ENGINE_DEEPSPEED: Engine
GRAD_SYNC_UNSPECIFIED: GradSync
GRAD_SYNC_ALL_REDUCE: GradSync
GRAD_SYNC_REDUCE_SCATTER: GradSync
GRAD_SYNC_AUTO: GradSync
PLACEMENT_UNSPECIFIED: Placement
PLACEMENT_PACK: Placement
PLACEMENT_SPREAD: Placement
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_BF16: Precision
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLING: JobState
JOB_STATE_CANCELLED: JobState

class OptimizerSpec(_message.Message):
    __slots__ = ("algorithm", "lr", "betas", "eps", "weight_decay", "maximize", "foreach", "momentum_decay", "decoupled_weight_decay")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BETAS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
    FOREACH_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_DECAY_FIELD_NUMBER: _ClassVar[int]
    DECOUPLED_WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    algorithm: Algorithm
    lr: float
    betas: _containers.RepeatedScalarFieldContainer[float]
    eps: float
    weight_decay: float
    maximize: bool
    foreach: bool
    momentum_decay: float
    decoupled_weight_decay: bool
    def __init__(self, algorithm: _Optional[_Union[Algorithm, str]] = ..., lr: _Optional[float] = ..., betas: _Optional[_Iterable[float]] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., maximize: _Optional[bool] = ..., foreach: _Optional[bool] = ..., momentum_decay: _Optional[float] = ..., decoupled_weight_decay: _Optional[bool] = ...) -> None: ...

class ShardingSpec(_message.Message):
    __slots__ = ("engine", "stage", "grad_sync", "bucket_mb", "overlap", "compile")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    GRAD_SYNC_FIELD_NUMBER: _ClassVar[int]
    BUCKET_MB_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    COMPILE_FIELD_NUMBER: _ClassVar[int]
    engine: Engine
    stage: int
    grad_sync: GradSync
    bucket_mb: float
    overlap: bool
    compile: bool
    def __init__(self, engine: _Optional[_Union[Engine, str]] = ..., stage: _Optional[int] = ..., grad_sync: _Optional[_Union[GradSync, str]] = ..., bucket_mb: _Optional[float] = ..., overlap: _Optional[bool] = ..., compile: _Optional[bool] = ...) -> None: ...

class ScalingSpec(_message.Message):
    __slots__ = ("num_workers", "use_gpu", "cpus_per_worker", "placement")
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    USE_GPU_FIELD_NUMBER: _ClassVar[int]
    CPUS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    placement: Placement
    def __init__(self, num_workers: _Optional[int] = ..., use_gpu: _Optional[bool] = ..., cpus_per_worker: _Optional[float] = ..., placement: _Optional[_Union[Placement, str]] = ...) -> None: ...

class TrainingSpec(_message.Message):
    __slots__ = ("max_steps", "batch_size", "seed", "grad_accum_steps", "clip_grad_norm", "precision", "checkpoint_every", "max_failures", "metrics_every")
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILURES_FIELD_NUMBER: _ClassVar[int]
    METRICS_EVERY_FIELD_NUMBER: _ClassVar[int]
    max_steps: int
    batch_size: int
    seed: int
    grad_accum_steps: int
    clip_grad_norm: float
    precision: Precision
    checkpoint_every: int
    max_failures: int
    metrics_every: int
    def __init__(self, max_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ..., grad_accum_steps: _Optional[int] = ..., clip_grad_norm: _Optional[float] = ..., precision: _Optional[_Union[Precision, str]] = ..., checkpoint_every: _Optional[int] = ..., max_failures: _Optional[int] = ..., metrics_every: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "task", "task_args", "labels", "optimizer", "sharding", "scaling", "training")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_ARGS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SHARDING_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    task_args: _struct_pb2.Struct
    labels: _containers.ScalarMap[str, str]
    optimizer: OptimizerSpec
    sharding: ShardingSpec
    scaling: ScalingSpec
    training: TrainingSpec
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., task_args: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., sharding: _Optional[_Union[ShardingSpec, _Mapping]] = ..., scaling: _Optional[_Union[ScalingSpec, _Mapping]] = ..., training: _Optional[_Union[TrainingSpec, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("step", "path", "time")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class MetricsRecord(_message.Message):
    __slots__ = ("job_id", "attempt", "step", "time", "rank", "world_size", "loss", "accuracy", "samples_per_second", "lr", "phase_seconds", "optimizer", "state_bytes_per_rank", "final", "checkpoint", "extra")
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class OptimizerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    step: int
    time: _timestamp_pb2.Timestamp
    rank: int
    world_size: int
    loss: float
    accuracy: float
    samples_per_second: float
    lr: float
    phase_seconds: _containers.ScalarMap[str, float]
    optimizer: _containers.ScalarMap[str, float]
    state_bytes_per_rank: _containers.RepeatedScalarFieldContainer[int]
    final: bool
    checkpoint: Checkpoint
    extra: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., step: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., lr: _Optional[float] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ..., optimizer: _Optional[_Mapping[str, float]] = ..., state_bytes_per_rank: _Optional[_Iterable[int]] = ..., final: _Optional[bool] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., extra: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "owner", "spec", "state", "state_reason", "created_at", "updated_at", "started_at", "finished_at", "attempt", "latest_metrics", "checkpoint", "idempotency_key", "ray_job_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LATEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    RAY_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    owner: str
    spec: JobSpec
    state: JobState
    state_reason: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    attempt: int
    latest_metrics: MetricsRecord
    checkpoint: Checkpoint
    idempotency_key: str
    ray_job_id: str
    def __init__(self, job_id: _Optional[str] = ..., owner: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., state_reason: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ..., latest_metrics: _Optional[_Union[MetricsRecord, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., ray_job_id: _Optional[str] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("state", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    reason: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("sequence", "job_id", "time", "attempt", "state_change", "metrics")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    job_id: str
    time: _timestamp_pb2.Timestamp
    attempt: int
    state_change: StateChange
    metrics: MetricsRecord
    def __init__(self, sequence: _Optional[int] = ..., job_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ..., state_change: _Optional[_Union[StateChange, _Mapping]] = ..., metrics: _Optional[_Union[MetricsRecord, _Mapping]] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "idempotency_key")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    idempotency_key: str
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "labels", "page_size", "page_token", "owner")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    labels: _containers.ScalarMap[str, str]
    page_size: int
    page_token: str
    owner: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "from_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., from_sequence: _Optional[int] = ...) -> None: ...

class StreamLogsRequest(_message.Message):
    __slots__ = ("job_id", "follow")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    follow: bool
    def __init__(self, job_id: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("job_id", "record")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    record: MetricsRecord
    def __init__(self, job_id: _Optional[str] = ..., record: _Optional[_Union[MetricsRecord, _Mapping]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
