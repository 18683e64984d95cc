"""JobSpec: the typed, validated description of one training job (no protobuf here).

A spec arrives from the network (gRPC, a YAML/JSON file), so every field is
checked for type and range, unknown keys are errors, and *every* problem is
reported at once::

    >>> JobSpec.from_dict({"name": "x", "task": "digits", "optimizer": {"lr": -1}})
    Traceback (most recent call last):
    SpecError: invalid job spec: optimizer.lr: must be > 0, got -1

Sections are frozen, keyword-only dataclasses; each field's docstring says what
it means, its ``metadata["rule"]`` says what values are allowed (the rule
combinators live in :mod:`zerotrain.service.spec_rules`). Constructing a section
directly runs the same checks (``SpecError`` on a bad value).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zerotrain.service.errors import SpecError
from zerotrain.service.spec_rules import (
    Section,
    boolean,
    choice,
    number,
    required,
    section_rule,
    spec_field,
    text,
)
from zerotrain.service.tasks.registry import (
    CUSTOM_TASK_PATTERN,
    TASK_NAME_PATTERN,
    get_task,
    is_custom_task,
    list_tasks,
)

__all__ = [
    "JobSpec",
    "OptimizerSpec",
    "ScalingSpec",
    "ShardingSpec",
    "TrainingSpec",
    "load_spec",
    "save_spec",
]

MAX_NAME_LENGTH = 128
MAX_LABELS = 32
MAX_TASK_ARGS = 64
MAX_STRING_LENGTH = 1024
_LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9_.\-/]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.\-]{0,61}[A-Za-z0-9])?)?$")
_TASK_ARG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _betas(path: str, value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None, f"{path}: must be a pair [beta1, beta2], got {value!r}"
    errors = []
    out = []
    for i, beta in enumerate(value):
        b, error = number(ge=0.0, lt=1.0)(f"{path}[{i}]", beta)
        if error:
            errors.append(error)
        out.append(b)
    if errors:
        return None, "\n".join(errors)
    return tuple(out), None


def _task_name(path: str, value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, str) or not value:
        return None, f"{path}: must be a non-empty string, got {value!r}"
    if len(value) > 256:
        return None, f"{path}: must have at most 256 characters, got {len(value)}"
    if is_custom_task(value):
        if not CUSTOM_TASK_PATTERN.match(value):
            return (
                None,
                f"{path}: custom tasks must look like package.module:function, got {value!r}",
            )
        return value, None
    if not TASK_NAME_PATTERN.match(value) or value not in list_tasks():
        known = ", ".join(list_tasks())
        return (
            None,
            f"{path}: unknown task {value!r}; registered tasks: {known} (or package.module:function)",
        )
    return value, None


def _labels(path: str, value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, Mapping):
        return None, f"{path}: must be a mapping of string to string, got {type(value).__name__}"
    if len(value) > MAX_LABELS:
        return None, f"{path}: must have at most {MAX_LABELS} entries, got {len(value)}"
    errors = []
    for key, item in value.items():
        if not isinstance(key, str) or not _LABEL_KEY.match(key):
            errors.append(
                f"{path}.{key}: label keys must be 1-63 characters of [a-z0-9_.-/], "
                f"starting and ending alphanumeric, got {key!r}"
            )
        elif not isinstance(item, str) or not _LABEL_VALUE.match(item):
            errors.append(
                f"{path}.{key}: label values must be 0-63 characters of [A-Za-z0-9_.-], "
                f"starting and ending alphanumeric, got {item!r}"
            )
    if errors:
        return None, "\n".join(errors)
    return dict(value), None


def _task_args(path: str, value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, Mapping):
        return None, f"{path}: must be a mapping, got {type(value).__name__}"
    if len(value) > MAX_TASK_ARGS:
        return None, f"{path}: must have at most {MAX_TASK_ARGS} entries, got {len(value)}"
    errors = []
    for key, item in value.items():
        if not isinstance(key, str) or not _TASK_ARG_KEY.match(key):
            errors.append(f"{path}.{key}: keys must be identifiers of at most 64 characters")
        elif isinstance(item, float) and not math.isfinite(item):
            errors.append(f"{path}.{key}: must be finite, got {item!r}")
        elif isinstance(item, str):
            _, error = text(max_length=MAX_STRING_LENGTH)(f"{path}.{key}", item)
            if error:
                errors.append(error)
        elif not isinstance(item, (bool, int, float)):
            errors.append(
                f"{path}.{key}: values must be a string, number or boolean, got {type(item).__name__}"
            )
    if errors:
        return None, "\n".join(errors)
    return dict(value), None


# ------------------------------------------------------------------------ sections
@dataclass(frozen=True, kw_only=True)
class OptimizerSpec(Section):
    """The optimizer: every option of :class:`optim.Adamax` / :class:`optim.Nadam`."""

    _path = "optimizer"

    algorithm: str = spec_field("nadam", choice("adamax", "nadam"))
    """``adamax`` or ``nadam``."""
    lr: float = spec_field(2e-3, number(gt=0.0, le=10.0))
    """Learning rate (> 0)."""
    betas: tuple[float, float] = spec_field((0.9, 0.999), _betas)
    """Coefficients for the running averages, each in [0, 1)."""
    eps: float = spec_field(1e-8, number(ge=0.0, le=1.0))
    """Term added to the denominator for numerical stability (>= 0)."""
    weight_decay: float = spec_field(0.0, number(ge=0.0, le=10.0))
    """L2 penalty, or decoupled decay for Nadam with ``decoupled_weight_decay`` (>= 0)."""
    maximize: bool = spec_field(False, boolean())
    """Maximise the objective instead of minimising it."""
    foreach: bool | None = spec_field(None, boolean(optional=True))
    """Use the multi-tensor implementation (``null``: the optimizer decides)."""
    momentum_decay: float = spec_field(4e-3, number(ge=0.0, le=1.0))
    """Nadam only: momentum decay psi (>= 0)."""
    decoupled_weight_decay: bool = spec_field(False, boolean())
    """Nadam only: AdamW-style decoupled weight decay."""

    def _cross_check(self) -> list[str]:
        errors = []
        if self.algorithm == "adamax":
            if self.momentum_decay != 4e-3:
                errors.append("optimizer.momentum_decay: only applies to algorithm 'nadam'")
            if self.decoupled_weight_decay:
                errors.append("optimizer.decoupled_weight_decay: only applies to algorithm 'nadam'")
        return errors

    def options(self) -> dict[str, Any]:
        """Keyword options for the optimizer class (``optim.Adamax`` or ``optim.Nadam``)."""
        opts: dict[str, Any] = {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "maximize": self.maximize,
            "foreach": self.foreach,
        }
        if self.algorithm == "nadam":
            opts["momentum_decay"] = self.momentum_decay
            opts["decoupled_weight_decay"] = self.decoupled_weight_decay
        return opts


@dataclass(frozen=True, kw_only=True)
class ShardingSpec(Section):
    """How optimizer state is sharded and gradients are synchronised."""

    _path = "sharding"

    engine: str = spec_field("native", choice("native", "deepspeed"))
    """``native`` (optim.ZeroOptimizer) or ``deepspeed`` (our optimizer as DeepSpeed's client)."""
    stage: int = spec_field(2, choice(1, 2))
    """ZeRO stage: 1 shards optimizer state, 2 also shards reduced gradients."""
    grad_sync: str = spec_field("auto", choice("auto", "all_reduce", "reduce_scatter"))
    """Gradient collective (native engine): ``auto`` picks the faster for the backend
    (always ``all_reduce`` at stage 1); ``reduce_scatter`` needs stage 2."""
    bucket_mb: float = spec_field(25.0, number(gt=0.0, le=4096.0))
    """Gradient bucket size in MiB (> 0)."""
    overlap: bool = spec_field(True, boolean())
    """Overlap gradient communication with the backward pass."""
    compile: bool = spec_field(True, boolean())
    """Native engine: run the optimizer step as one fused ``torch.compile`` kernel where a
    compiler works (logged fallback to the eager step); ``false``: eager, torch's bits."""

    def _cross_check(self) -> list[str]:
        errors = []
        if self.engine == "deepspeed" and self.grad_sync != "auto":
            errors.append(
                "sharding.grad_sync: must be 'auto' with engine 'deepspeed' "
                f"(DeepSpeed chooses its own collectives), got {self.grad_sync!r}"
            )
        if self.stage == 1 and self.grad_sync == "reduce_scatter":
            errors.append(
                "sharding.grad_sync: 'reduce_scatter' is ZeRO stage 2; set sharding.stage: 2 "
                "or use 'all_reduce'"
            )
        return errors

    def resolved_grad_sync(self) -> str:
        """The ``grad_sync`` option to pass to ``ZeroOptimizer``."""
        if self.stage == 1:
            return "all_reduce"
        return self.grad_sync


@dataclass(frozen=True, kw_only=True)
class ScalingSpec(Section):
    """How many Ray Train workers, and what each one gets."""

    _path = "scaling"

    num_workers: int = spec_field(2, number(ge=1, le=1024, integer=True))
    """Data-parallel workers (1-1024)."""
    use_gpu: bool = spec_field(False, boolean())
    """One GPU per worker (process group NCCL); otherwise CPU with gloo."""
    cpus_per_worker: float = spec_field(1.0, number(gt=0.0, le=1024.0))
    """CPUs reserved per worker (> 0)."""
    placement: str = spec_field("PACK", choice("PACK", "SPREAD"))
    """Placement group strategy: ``PACK`` (fewest nodes) or ``SPREAD`` (across nodes)."""


@dataclass(frozen=True, kw_only=True)
class TrainingSpec(Section):
    """The training loop."""

    _path = "training"

    max_steps: int = spec_field(100, number(ge=1, le=10_000_000, integer=True))
    """Optimizer steps to run (1-10,000,000)."""
    batch_size: int = spec_field(32, number(ge=1, le=65_536, integer=True))
    """Samples per worker per micro-batch."""
    seed: int = spec_field(0, number(ge=0, le=2**63 - 1, integer=True))
    """Seeds model init and the data order (same seed, same run)."""
    grad_accum_steps: int = spec_field(1, number(ge=1, le=1024, integer=True))
    """Micro-batches accumulated per optimizer step."""
    clip_grad_norm: float | None = spec_field(None, number(gt=0.0, optional=True))
    """Clip the global gradient norm to this value (``null``: no clipping)."""
    precision: str = spec_field("fp32", choice("fp32", "bf16"))
    """``fp32``, or ``bf16`` autocast for forward/backward (fp32 params and state)."""
    checkpoint_every: int = spec_field(50, number(ge=0, le=10_000_000, integer=True))
    """Steps between checkpoints (0: only the final one)."""
    max_failures: int = spec_field(2, number(ge=0, le=1000, integer=True))
    """Worker-group restarts allowed after a failure (0-1000)."""
    metrics_every: int = spec_field(10, number(ge=1, le=10_000_000, integer=True))
    """Steps between metrics records."""


@dataclass(frozen=True, kw_only=True)
class JobSpec(Section):
    """One training job. Build it with :meth:`from_dict` or :func:`load_spec`."""

    _path = ""

    name: str = required(text(min_length=1, max_length=MAX_NAME_LENGTH))
    """Human-readable name (1-128 characters, no control characters)."""
    task: str = required(_task_name)
    """A registered task (``digits``, ``charlm``, ``regression``) or ``package.module:function``."""
    task_args: dict[str, Any] = field(default_factory=dict, metadata={"rule": _task_args})
    """Task arguments (scalars), checked against the task's schema."""
    labels: dict[str, str] = field(default_factory=dict, metadata={"rule": _labels})
    """Free-form labels for filtering (at most 32)."""
    optimizer: OptimizerSpec = field(
        default_factory=OptimizerSpec, metadata={"rule": section_rule(OptimizerSpec)}
    )
    """Optimizer algorithm and hyperparameters."""
    sharding: ShardingSpec = field(
        default_factory=ShardingSpec, metadata={"rule": section_rule(ShardingSpec)}
    )
    """ZeRO engine and gradient synchronisation."""
    scaling: ScalingSpec = field(
        default_factory=ScalingSpec, metadata={"rule": section_rule(ScalingSpec)}
    )
    """Workers and resources."""
    training: TrainingSpec = field(
        default_factory=TrainingSpec, metadata={"rule": section_rule(TrainingSpec)}
    )
    """Steps, batch size, seed, checkpointing."""

    def _cross_check(self) -> list[str]:
        if is_custom_task(self.task):
            return []
        _, errors = get_task(self.task).resolve_args(self.task_args)
        return errors

    @classmethod
    def from_dict(cls, data: Any) -> JobSpec:
        """Validate ``data`` and build a spec; raises :class:`SpecError` listing every problem."""
        if not isinstance(data, Mapping):
            raise SpecError([f"spec: must be a mapping, got {type(data).__name__}"])
        errors: list[str] = []
        spec = cls._from_dict(data, "", errors)
        if spec is None:
            # Construction stopped at other errors: still report bad task arguments.
            task, task_errors = _task_name("task", data.get("task"))
            args, args_errors = _task_args("task_args", data.get("task_args", {}))
            if not task_errors and not args_errors and not is_custom_task(task):
                errors.extend(e for e in get_task(task).resolve_args(args)[1] if e not in errors)
        if errors or spec is None:
            raise SpecError(errors)
        return spec


# ------------------------------------------------------------------------- loading
def load_spec(path: str | Path) -> JobSpec:
    """Load a spec from a YAML (``.yaml``/``.yml``) or JSON file.

    Raises :class:`SpecError` for a missing file, malformed YAML/JSON (naming
    the file and line) or invalid fields.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([f"{path}: cannot read spec file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: spec file is not UTF-8 text"]) from exc
    if path.suffix.lower() == ".json":
        data = _parse_json(text, str(path))
    else:
        data = _parse_yaml(text, str(path))
    return JobSpec.from_dict(data)


def save_spec(spec: JobSpec, path: str | Path) -> Path:
    """Write ``spec`` as JSON to ``path`` (0600, atomically, never through a symlink).

    The parent directory is created (0700) if missing. :func:`load_spec` reads
    the file back into an equal spec.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(spec.to_dict(), f, separators=(",", ":"), sort_keys=True)
    os.replace(tmp, path)
    return path


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError([f"{source}:{exc.lineno}: malformed JSON: {exc.msg}"]) from exc


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SpecError([f"{source}{line}: malformed YAML: {exc.problem or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise SpecError([f"{source}: malformed YAML: {exc}"]) from exc


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 would make it a string)."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
