"""JobSpec: the typed, validated description of one training job (no protobuf here).

A spec arrives from the network (gRPC, a YAML/JSON file), so every field is
checked for type and range, unknown keys are errors, and *every* problem is
reported at once::

    >>> JobSpec.from_dict({"name": "x", "task": "digits", "optimizer": {"lr": -1}})
    Traceback (most recent call last):
    SpecError: invalid job spec: optimizer.lr: must be > 0, got -1

Sections are frozen, keyword-only dataclasses; each field's docstring says what
it means, its ``metadata["rule"]`` says what values are allowed. Constructing
a section directly runs the same checks (``SpecError`` on a bad value).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "JobSpec",
    "OptimizerSpec",
    "ScalingSpec",
    "ShardingSpec",
    "SpecError",
    "TrainingSpec",
    "is_custom_task",
    "load_spec",
]

MAX_NAME_LENGTH = 128
MAX_LABELS = 32
MAX_TASK_ARGS = 64
MAX_STRING_LENGTH = 1024
_LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9_.\-/]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.\-]{0,61}[A-Za-z0-9])?)?$")
_TASK_ARG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SpecError(ValueError):
    """An invalid job spec. ``errors`` lists every problem as ``"<field>: <rule>, got <value>"``."""

    def __init__(self, errors: list[str] | str):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("invalid job spec: " + "; ".join(self.errors))

    def __reduce__(self):  # picklable across processes (Ray, gRPC threads)
        return (type(self), (self.errors,))


# --------------------------------------------------------------------------- rules
# A rule takes (path, value) and returns (normalised value, error or None).
Rule = Callable[[str, Any], tuple[Any, str | None]]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    optional: bool = False,
) -> Rule:
    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if value is None and optional:
            return None, None
        if integer:
            if isinstance(value, bool) or not isinstance(value, int):
                return None, f"{path}: must be an integer, got {value!r}"
        else:
            if not _is_number(value):
                return None, f"{path}: must be a number, got {value!r}"
            if not math.isfinite(value):
                return None, f"{path}: must be finite, got {value!r}"
            value = float(value)
        shown = _show(value)
        if gt is not None and not value > gt:
            return None, f"{path}: must be > {_show(gt)}, got {shown}"
        if ge is not None and not value >= ge:
            return None, f"{path}: must be >= {_show(ge)}, got {shown}"
        if lt is not None and not value < lt:
            return None, f"{path}: must be < {_show(lt)}, got {shown}"
        if le is not None and not value <= le:
            return None, f"{path}: must be <= {_show(le)}, got {shown}"
        return value, None

    return rule


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def _boolean(*, optional: bool = False) -> Rule:
    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if value is None and optional:
            return None, None
        if not isinstance(value, bool):
            return None, f"{path}: must be a boolean (true/false), got {value!r}"
        return value, None

    return rule


def _choice(*choices: Any) -> Rule:
    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if isinstance(value, bool) or value not in choices:
            allowed = ", ".join(_show(c) for c in choices)
            return None, f"{path}: must be one of {allowed}, got {value!r}"
        return value, None

    return rule


def _text(*, max_length: int, min_length: int = 0) -> Rule:
    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if not isinstance(value, str):
            return None, f"{path}: must be a string, got {value!r}"
        if len(value) < min_length:
            return None, f"{path}: must not be empty" if min_length == 1 else (
                f"{path}: must have at least {min_length} characters, got {len(value)}"
            )
        if len(value) > max_length:
            return None, f"{path}: must have at most {max_length} characters, got {len(value)}"
        if _CONTROL.search(value):
            return None, f"{path}: must not contain control characters, got {value!r}"
        return value, None

    return rule


def _betas(path: str, value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None, f"{path}: must be a pair [beta1, beta2], got {value!r}"
    errors = []
    out = []
    for i, beta in enumerate(value):
        b, error = _number(ge=0.0, lt=1.0)(f"{path}[{i}]", beta)
        if error:
            errors.append(error)
        out.append(b)
    if errors:
        return None, "\n".join(errors)
    return tuple(out), None


def _task_name(path: str, value: Any) -> tuple[Any, str | None]:
    from service.tasks.registry import (  # local: the registry is light, but optional here
        CUSTOM_TASK_PATTERN,
        TASK_NAME_PATTERN,
        list_tasks,
    )

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
            _, error = _text(max_length=MAX_STRING_LENGTH)(f"{path}.{key}", item)
            if error:
                errors.append(error)
        elif not isinstance(item, (bool, int, float)):
            errors.append(
                f"{path}.{key}: values must be a string, number or boolean, got {type(item).__name__}"
            )
    if errors:
        return None, "\n".join(errors)
    return dict(value), None


def _spec_field(default: Any, rule: Rule) -> Any:
    return field(default=default, metadata={"rule": rule})


def _required(rule: Rule) -> Any:
    return field(metadata={"rule": rule})


# ------------------------------------------------------------------------ sections
class _Section:
    """Shared machinery: rule checks on construction, from_dict, to_dict."""

    _path: str = ""

    def __post_init__(self) -> None:
        errors: list[str] = []
        for f in fields(self):  # type: ignore[arg-type]
            value, error = f.metadata["rule"](_join(self._path, f.name), getattr(self, f.name))
            if error:
                errors.extend(error.split("\n"))
            else:
                object.__setattr__(self, f.name, value)
        errors.extend(self._cross_check())
        if errors:
            raise SpecError(errors)

    def _cross_check(self) -> list[str]:
        """Rules that involve more than one field (override per section)."""
        return []

    @classmethod
    def _from_dict(cls, data: Any, path: str, errors: list[str]) -> Any:
        """Build the section from ``data``, appending every problem to ``errors``."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            errors.append(f"{path}: must be a mapping, got {type(data).__name__}")
            return None
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        for key in data:
            if key not in names:
                errors.append(
                    f"{_join(path, str(key))}: unknown field; expected one of: {', '.join(names)}"
                )
        values: dict[str, Any] = {}
        ok = True
        for f in fields(cls):  # type: ignore[arg-type]
            where = _join(path, f.name)
            if f.name in data:
                raw = data[f.name]
            elif f.default is not MISSING:
                raw = f.default
            elif f.default_factory is not MISSING:
                raw = f.default_factory()
            else:
                errors.append(f"{where}: required field is missing")
                ok = False
                continue
            value, error = f.metadata["rule"](where, raw)
            if error:
                errors.extend(error.split("\n"))
                ok = False
            else:
                values[f.name] = value
        if not ok:
            return None
        try:
            return cls(**values)
        except SpecError as exc:  # cross-field rules
            errors.extend(exc.errors)
            return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(to_dict())`` gives an equal section."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec(_Section):
    """The optimizer: every option of :class:`optim.Adamax` / :class:`optim.Nadam`."""

    _path = "optimizer"

    algorithm: str = _spec_field("nadam", _choice("adamax", "nadam"))
    """``adamax`` or ``nadam``."""
    lr: float = _spec_field(2e-3, _number(gt=0.0, le=10.0))
    """Learning rate (> 0)."""
    betas: tuple[float, float] = _spec_field((0.9, 0.999), _betas)
    """Coefficients for the running averages, each in [0, 1)."""
    eps: float = _spec_field(1e-8, _number(ge=0.0, le=1.0))
    """Term added to the denominator for numerical stability (>= 0)."""
    weight_decay: float = _spec_field(0.0, _number(ge=0.0, le=10.0))
    """L2 penalty, or decoupled decay for Nadam with ``decoupled_weight_decay`` (>= 0)."""
    maximize: bool = _spec_field(False, _boolean())
    """Maximise the objective instead of minimising it."""
    foreach: bool | None = _spec_field(None, _boolean(optional=True))
    """Use the multi-tensor implementation (``null``: the optimizer decides)."""
    momentum_decay: float = _spec_field(4e-3, _number(ge=0.0, le=1.0))
    """Nadam only: momentum decay psi (>= 0)."""
    decoupled_weight_decay: bool = _spec_field(False, _boolean())
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
class ShardingSpec(_Section):
    """How optimizer state is sharded and gradients are synchronised."""

    _path = "sharding"

    engine: str = _spec_field("native", _choice("native", "deepspeed"))
    """``native`` (optim.ZeroOptimizer) or ``deepspeed`` (our optimizer as DeepSpeed's client)."""
    stage: int = _spec_field(2, _choice(1, 2))
    """ZeRO stage: 1 shards optimizer state, 2 also shards reduced gradients."""
    grad_sync: str = _spec_field("auto", _choice("auto", "all_reduce", "reduce_scatter"))
    """Gradient collective (native engine): ``auto`` picks the faster for the backend
    (always ``all_reduce`` at stage 1); ``reduce_scatter`` needs stage 2."""
    bucket_mb: float = _spec_field(25.0, _number(gt=0.0, le=4096.0))
    """Gradient bucket size in MiB (> 0)."""
    overlap: bool = _spec_field(True, _boolean())
    """Overlap gradient communication with the backward pass."""
    compile: bool = _spec_field(True, _boolean())
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
class ScalingSpec(_Section):
    """How many Ray Train workers, and what each one gets."""

    _path = "scaling"

    num_workers: int = _spec_field(2, _number(ge=1, le=1024, integer=True))
    """Data-parallel workers (1-1024)."""
    use_gpu: bool = _spec_field(False, _boolean())
    """One GPU per worker (process group NCCL); otherwise CPU with gloo."""
    cpus_per_worker: float = _spec_field(1.0, _number(gt=0.0, le=1024.0))
    """CPUs reserved per worker (> 0)."""
    placement: str = _spec_field("PACK", _choice("PACK", "SPREAD"))
    """Placement group strategy: ``PACK`` (fewest nodes) or ``SPREAD`` (across nodes)."""


@dataclass(frozen=True, kw_only=True)
class TrainingSpec(_Section):
    """The training loop."""

    _path = "training"

    max_steps: int = _spec_field(100, _number(ge=1, le=10_000_000, integer=True))
    """Optimizer steps to run (1-10,000,000)."""
    batch_size: int = _spec_field(32, _number(ge=1, le=65_536, integer=True))
    """Samples per worker per micro-batch."""
    seed: int = _spec_field(0, _number(ge=0, le=2**63 - 1, integer=True))
    """Seeds model init and the data order (same seed, same run)."""
    grad_accum_steps: int = _spec_field(1, _number(ge=1, le=1024, integer=True))
    """Micro-batches accumulated per optimizer step."""
    clip_grad_norm: float | None = _spec_field(None, _number(gt=0.0, optional=True))
    """Clip the global gradient norm to this value (``null``: no clipping)."""
    precision: str = _spec_field("fp32", _choice("fp32", "bf16"))
    """``fp32``, or ``bf16`` autocast for forward/backward (fp32 params and state)."""
    checkpoint_every: int = _spec_field(50, _number(ge=0, le=10_000_000, integer=True))
    """Steps between checkpoints (0: only the final one)."""
    max_failures: int = _spec_field(2, _number(ge=0, le=1000, integer=True))
    """Worker-group restarts allowed after a failure (0-1000)."""
    metrics_every: int = _spec_field(10, _number(ge=1, le=10_000_000, integer=True))
    """Steps between metrics records."""


def _section_rule(cls: type[_Section]) -> Rule:
    def rule(path: str, value: Any) -> tuple[Any, str | None]:
        if isinstance(value, cls):
            return value, None
        errors: list[str] = []
        section = cls._from_dict(value, path, errors)
        if errors:
            return None, "\n".join(errors)
        return section, None

    return rule


@dataclass(frozen=True, kw_only=True)
class JobSpec(_Section):
    """One training job. Build it with :meth:`from_dict` or :func:`load_spec`."""

    _path = ""

    name: str = _required(_text(min_length=1, max_length=MAX_NAME_LENGTH))
    """Human-readable name (1-128 characters, no control characters)."""
    task: str = _required(_task_name)
    """A registered task (``digits``, ``charlm``, ``regression``) or ``package.module:function``."""
    task_args: dict[str, Any] = field(default_factory=dict, metadata={"rule": _task_args})
    """Task arguments (scalars), checked against the task's schema."""
    labels: dict[str, str] = field(default_factory=dict, metadata={"rule": _labels})
    """Free-form labels for filtering (at most 32)."""
    optimizer: OptimizerSpec = field(
        default_factory=OptimizerSpec, metadata={"rule": _section_rule(OptimizerSpec)}
    )
    """Optimizer algorithm and hyperparameters."""
    sharding: ShardingSpec = field(
        default_factory=ShardingSpec, metadata={"rule": _section_rule(ShardingSpec)}
    )
    """ZeRO engine and gradient synchronisation."""
    scaling: ScalingSpec = field(
        default_factory=ScalingSpec, metadata={"rule": _section_rule(ScalingSpec)}
    )
    """Workers and resources."""
    training: TrainingSpec = field(
        default_factory=TrainingSpec, metadata={"rule": _section_rule(TrainingSpec)}
    )
    """Steps, batch size, seed, checkpointing."""

    def _cross_check(self) -> list[str]:
        if is_custom_task(self.task):
            return []
        from service.tasks.registry import get_task

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
                from service.tasks.registry import get_task

                errors.extend(e for e in get_task(task).resolve_args(args)[1] if e not in errors)
        if errors or spec is None:
            raise SpecError(errors)
        return spec


def is_custom_task(name: str) -> bool:
    """True when ``name`` is a custom task (``package.module:function``), not a registered one."""
    return ":" in name


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
