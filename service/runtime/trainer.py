"""Build and run the Ray Train ``TorchTrainer`` for a :class:`~zerotrain.service.spec.JobSpec`.

The process group backend follows the hardware (NCCL with GPUs, gloo on CPU);
``ScalingConfig`` comes from ``spec.scaling``; ``FailureConfig(max_failures)``
restarts the worker group from the latest checkpoint; checkpoints and run files
go to the run directory ``<storage>/<job_id>`` (a local path or a URI Ray's
storage accepts; default storage ``./runs``). Running a job id again resumes
it from its latest checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from zerotrain.service.errors import SpecError
from zerotrain.service.spec import JobSpec
from zerotrain.service.tasks.registry import is_custom_task

__all__ = [
    "JOB_ID_PATTERN",
    "build_trainer",
    "check_job",
    "default_storage",
    "local_run_directory",
    "resolve_storage",
    "run_directory",
    "run_job",
]

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
"""Job ids name the run directory: 1-128 characters of [A-Za-z0-9_.-]."""
CHECKPOINTS_TO_KEEP = 2


def default_storage() -> str:
    """``./runs``: the ``runs`` directory in the working directory."""
    return "runs"


def resolve_storage(storage: str | os.PathLike | None) -> str:
    """A URI (``scheme://...``) as is; a local path made absolute (Ray requires it)."""
    storage = os.fspath(storage) if storage is not None else default_storage()
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def run_directory(storage: str | os.PathLike | None, job_id: str) -> str:
    """The run's directory, ``<storage>/<job_id>``: an absolute path or a URI."""
    return f"{resolve_storage(storage).rstrip('/')}/{job_id}"


def local_run_directory(storage: str | os.PathLike | None, job_id: str) -> Path:
    """Where the run's local files (``ray.log``) go: the run directory when ``storage`` is
    a local path, else ``./runs/<job_id>`` (a URI's store cannot be appended to)."""
    directory = run_directory(storage, job_id)
    if "://" in directory:
        return Path(resolve_storage(None)) / job_id
    return Path(directory)


def check_job(spec: JobSpec, *, job_id: str, allow_custom_tasks: bool = False) -> None:
    """Checks that need no cluster: the job id's syntax and whether a custom task is allowed.

    Raises ``ValueError`` for a bad job id and :class:`SpecError` for a disallowed task.
    """
    if not JOB_ID_PATTERN.match(job_id):
        raise ValueError(f"job id must match {JOB_ID_PATTERN.pattern}, got {job_id!r}")
    if is_custom_task(spec.task) and not allow_custom_tasks:
        raise SpecError(
            [
                f"task: custom task {spec.task!r} is disabled (it runs arbitrary code); "
                "enable custom tasks to allow it"
            ]
        )


def build_trainer(
    spec: JobSpec,
    *,
    job_id: str,
    storage: str | os.PathLike | None = None,
    allow_custom_tasks: bool = False,
    metrics_file: str | None = None,
) -> Any:
    """A ``ray.train.torch.TorchTrainer`` that runs ``spec`` as run ``job_id``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from zerotrain.service.runtime.worker import train_loop_per_worker

    check_job(spec, job_id=job_id, allow_custom_tasks=allow_custom_tasks)
    storage = resolve_storage(storage)
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec,  # the validated JobSpec itself: workers need not parse it again
            "job_id": job_id,
            "storage": run_directory(storage, job_id),
            "allow_custom_tasks": allow_custom_tasks,
            "metrics_file": metrics_file,
        },
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement,
        ),
        run_config=RunConfig(
            name=job_id,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=spec.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
        ),
    )


def run_job(
    spec: JobSpec,
    *,
    job_id: str,
    storage: str | os.PathLike | None = None,
    allow_custom_tasks: bool = False,
    metrics_file: str | None = None,
) -> Any:
    """Run ``spec`` on the connected Ray cluster; returns the ``ray.train.Result``.

    Raises ``ray.train.TrainingFailedError`` when training fails beyond
    ``max_failures`` restarts.
    """
    trainer = build_trainer(
        spec,
        job_id=job_id,
        storage=storage,
        allow_custom_tasks=allow_custom_tasks,
        metrics_file=metrics_file,
    )
    return trainer.fit()
