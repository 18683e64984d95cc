"""The Ray Train worker loop: build the task, train with a ZeRO engine, checkpoint, report.

Every rank runs :func:`train_loop_per_worker`. The data order is a function of
the seed and the stream *position* (:mod:`zerotrain.service.runtime.data`), checkpoints
hold the position, and model, optimizer and RNG state are restored from
``ray.train.get_checkpoint()``, so a restarted worker group continues the
exact trajectory of an uninterrupted run.

``ray.train.report`` is called only with a checkpoint (every
``checkpoint_every`` steps and at the end): in Train V2 each call synchronises
the group through the controller. Progress goes through the reporter instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zerotrain.service.records import PHASES
from zerotrain.service.runtime import compile_cache
from zerotrain.service.runtime.data import SampleStream
from zerotrain.service.runtime.engines import Engine, make_engine
from zerotrain.service.runtime.phase_clock import PhaseClock
from zerotrain.service.runtime.reporter import Reporter, make_reporter
from zerotrain.service.runtime.staging import clean_stale_staging, staged_checkpoint
from zerotrain.service.seeds import resume_seed, worker_seed
from zerotrain.service.spec import JobSpec, TrainingSpec
from zerotrain.service.tasks import get_task

__all__ = ["CHECKPOINT_META", "CheckpointCorrupted", "train_loop_per_worker", "verify_checksums"]

CHECKPOINT_META = "meta.json"
"""Checkpoint file (rank 0) with step, stream position, world size and engine."""
CHECKSUMS_DIR = "checksums"
"""Per-rank manifests (``checksums/rank-<r>.json``): SHA-256 and size of every file that
rank wrote into the checkpoint (model, meta, RNG state, optimizer shards)."""


@dataclass
class _Window:
    """Accumulates what a metrics record averages over (the steps since the last record)."""

    device: torch.device
    steps: int = 0
    loss_sum: torch.Tensor = field(init=False)
    """On the training device: adding to it never waits for the device."""
    started: float = field(default_factory=time.perf_counter)
    clock: PhaseClock = field(init=False)

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.clock = PhaseClock(self.device)


@dataclass(frozen=True, kw_only=True)
class _Worker:
    """This worker's place in the run: what the loop needs besides the spec and the task."""

    job_id: str
    storage: str
    """The run's directory (path or URI) that checkpoint paths are reported under."""
    rank: int
    world: int
    attempt: int
    device: torch.device


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: ``config`` has ``spec`` (the validated :class:`JobSpec`), ``job_id``,
    ``storage`` (the run's storage path or URI, for reporting checkpoint paths),
    ``allow_custom_tasks`` and optionally ``metrics_file``."""
    import ray.train

    from zerotrain.service.runtime.run_files import RunFiles

    spec: JobSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(spec)
    compile_cache.use_shared_cache(str(config.get("storage", "")))

    files = RunFiles.from_train_context()
    attempt = _broadcast(files.next_attempt() if rank == 0 else None)
    if rank == 0:
        clean_stale_staging(str(config.get("storage", "")), attempt)
    files.write_worker(attempt, rank, {"host": socket.gethostname(), "world_size": world})

    task = get_task(spec.task, allow_custom=config.get("allow_custom_tasks", False)).build(
        spec.task_args, seed=spec.training.seed
    )
    model = task.model.to(device)

    step, position = 0, 0
    checkpoint = ray.train.get_checkpoint()
    meta: dict[str, Any] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            verify_checksums(Path(directory))  # never resume from a corrupted file
            meta = json.loads((Path(directory) / CHECKPOINT_META).read_text())
            _check_resumable(meta, spec, world)
            model.load_state_dict(torch.load(Path(directory) / "model.pt", map_location=device))
            engine = make_engine(model, spec, world_size=world)
            engine.load(Path(directory))
            _load_rng(Path(directory), rank, world, meta, spec)
        step, position = meta["step"], meta["position"]
    else:
        engine = make_engine(model, spec, world_size=world)
        torch.manual_seed(worker_seed(spec.training.seed, rank))

    reporter = make_reporter(metrics_file=config.get("metrics_file")) if rank == 0 else None
    if rank == 0:
        # Plain stdout: it lands in the Ray job's log that the service streams to users.
        _say(
            f"zerotrain: job {config['job_id']} attempt {attempt}: task {spec.task}, "
            f"{world} workers, engine {engine.description}, "
            + (f"resuming at step {step}" if step else "starting")
        )
    worker = _Worker(
        job_id=config["job_id"],
        storage=str(config.get("storage", "")),
        rank=rank,
        world=world,
        attempt=attempt,
        device=device,
    )
    try:
        _train(spec, worker, task, engine, reporter, step=step, position=position)
    finally:
        engine.close()
        if reporter is not None:
            reporter.close()


def _train(
    spec: JobSpec,
    worker: _Worker,
    task: Any,
    engine: Engine,
    reporter: Reporter | None,
    *,
    step: int,
    position: int,
) -> None:
    """Train from ``step`` (stream ``position``) to ``max_steps``, reporting and checkpointing."""
    training = spec.training
    device, rank, world = worker.device, worker.rank, worker.world
    stream = SampleStream(len(task.train), training.seed)
    batch, accum = training.batch_size, training.grad_accum_steps
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if training.precision == "bf16"
        else nullcontext()
    )
    window = _Window(device)
    engine.module.train()
    if step >= training.max_steps and rank == 0:
        _say(f"zerotrain: step {step} >= max_steps {training.max_steps}: done")
    while step < training.max_steps:
        # Measuring the update costs a pass over the shard: only for reported steps.
        engine.track_update_stats(_reports_at(training, step + 1))
        for micro in range(accum):
            last = micro == accum - 1
            clock = window.clock
            t0 = clock.mark()
            start = stream.micro_batch_start(
                position, micro=micro, rank=rank, world_size=world, batch_size=batch
            )
            inputs, targets = task.train.batch(stream.indices(start, batch))
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device)
            t1 = clock.mark()
            with autocast:
                loss = task.loss(engine.module(inputs), targets)
            t2 = clock.mark()
            engine.backward(loss, last=last)
            t3 = clock.mark()
            engine.optimizer_step(last=last)
            t4 = clock.mark()
            for phase, begin, end in (("data", t0, t1), ("forward", t1, t2),
                                      ("backward", t2, t3), ("optimizer", t3, t4)):  # fmt: skip
                clock.add(phase, begin, end)
            window.loss_sum += loss.detach().double() / accum
        step += 1
        position += accum * world * batch
        window.steps += 1

        final = step == training.max_steps
        if not _reports_at(training, step):
            continue
        # The record first, so that the checkpoint's report (Ray Train's result
        # metrics) carries its loss and held-out metrics, not only the step.
        record = _metrics_record(spec, worker, task, engine, window, step=step, final=final)
        if _checkpoints_at(training, step):
            record["checkpoint"] = _save_checkpoint(
                spec, worker, engine, _result_metrics(record), step=step, position=position
            )
        # Only now: neither evaluation nor checkpoint writes count as training time.
        window = _Window(device)
        if reporter is not None:
            reporter.emit(record)


def _say(line: str) -> None:
    """One line on stdout. Not ``print``: Ray Train V2 patches it to also log each
    call, so every printed line would show up twice in the job's log."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _phase_seconds(window: _Window, engine: Engine) -> dict[str, float]:
    """Mean seconds per step of each phase in ``window`` (reads the device's timers once)."""
    totals = window.clock.totals()
    timings = engine.collect_step_timings()
    for phase in ("communication", "compile"):
        if phase in timings:
            spent = min(timings[phase], totals["optimizer"])
            totals[phase] = spent
            totals["optimizer"] -= spent
    steps = max(window.steps, 1)
    return {p: totals[p] / steps for p in PHASES if p in totals}


def _checkpoints_at(training: TrainingSpec, step: int) -> bool:
    """Whether a checkpoint is saved after ``step`` (always after the last one)."""
    every = training.checkpoint_every
    return step == training.max_steps or bool(every and step % every == 0)


def _reports_at(training: TrainingSpec, step: int) -> bool:
    """Whether a metrics record is emitted after ``step``."""
    return _checkpoints_at(training, step) or step % training.metrics_every == 0


def _result_metrics(record: dict[str, Any]) -> dict[str, float]:
    """What a checkpoint reports to Ray Train: the record's top-level numbers (step,
    loss, samples/s, held-out metrics such as accuracy), not its bookkeeping."""
    return {
        key: value
        for key, value in record.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and key not in {"time", "rank", "attempt", "world_size"}
    }


def _metrics_record(
    spec: JobSpec,
    worker: _Worker,
    task: Any,
    engine: Engine,
    window: _Window,
    *,
    step: int,
    final: bool,
) -> dict[str, Any]:
    """Build the record (collective: every rank calls this; only rank 0's result is used)."""
    rank, world = worker.rank, worker.world
    elapsed = time.perf_counter() - window.started
    phases = _phase_seconds(window, engine)
    loss = window.loss_sum.reshape(1).clone()
    state_bytes = torch.tensor([engine.state_bytes()], dtype=torch.int64, device=loss.device)
    if dist.is_initialized() and world > 1:
        dist.all_reduce(loss)
        gathered = [torch.zeros_like(state_bytes) for _ in range(world)]
        dist.all_gather(gathered, state_bytes)
    else:
        gathered = [state_bytes]
    stats = engine.stats()
    training = spec.training
    samples = window.steps * training.grad_accum_steps * training.batch_size * world
    # Throughput of training: a one-off kernel compile is reported as its own phase.
    training_time = elapsed - phases.get("compile", 0.0) * max(window.steps, 1)
    record: dict[str, Any] = {
        "job_id": worker.job_id,
        "attempt": worker.attempt,
        "step": step,
        "time": time.time(),
        "rank": rank,
        "world_size": world,
        "loss": loss.item() / (world * max(window.steps, 1)),
        "samples_per_second": samples / training_time if training_time > 0 else 0.0,
        "lr": stats.get("lr", spec.optimizer.lr),
        "phase_seconds": phases,
        "optimizer": {k: float(v) for k, v in stats.items() if math.isfinite(v)},
        "state_bytes_per_rank": [int(t.item()) for t in gathered],
        "final": final,
    }
    if rank == 0:
        was_training = engine.model.training
        engine.model.eval()
        record.update(task.evaluate(engine.model))
        engine.model.train(was_training)
    return record


def _save_checkpoint(
    spec: JobSpec,
    worker: _Worker,
    engine: Engine,
    metrics: dict[str, float],
    *,
    step: int,
    position: int,
) -> dict[str, Any]:
    """Write this rank's part into a staging dir in the run directory and report it with
    ``metrics`` (which must hold ``step``); Train V2 merges the rank dirs into the checkpoint."""
    import ray.train

    rank = worker.rank
    name = f"checkpoint_{step:08d}"
    with staged_checkpoint(worker.storage, worker.attempt, rank, name) as directory:
        engine.save(directory)
        rng_dir = directory / "rng"
        rng_dir.mkdir(exist_ok=True)
        torch.save(_rng_state(), rng_dir / f"rank-{rank}.pt")
        if rank == 0:
            torch.save(engine.model.state_dict(), directory / "model.pt")
            meta = {
                "step": step,
                "position": position,
                "world_size": worker.world,
                "engine": engine.name,
                "seed": spec.training.seed,
                "job_id": worker.job_id,
                "attempt": worker.attempt,
                "time": time.time(),
            }
            (directory / CHECKPOINT_META).write_text(json.dumps(meta))
        _write_checksums(directory, rank)
        ray.train.report(
            {**metrics, "step": step},
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=name,
        )
    storage = worker.storage.rstrip("/")
    return {"step": step, "path": f"{storage}/{name}" if storage else name, "time": time.time()}


class CheckpointCorrupted(RuntimeError):
    """A checkpoint file is missing, truncated or altered (its SHA-256 does not match)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(directory: Path, rank: int) -> None:
    """Record SHA-256 and size of every file this rank wrote (before Ray merges the ranks)."""
    files = {
        str(path.relative_to(directory)): {"sha256": _sha256(path), "bytes": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
    (directory / CHECKSUMS_DIR).mkdir(exist_ok=True)
    (directory / CHECKSUMS_DIR / f"rank-{rank}.json").write_text(json.dumps(files))


def verify_checksums(directory: Path) -> None:
    """Check every file listed in the checkpoint's checksum manifests.

    Raises:
        CheckpointCorrupted: naming the file and what is wrong with it.
    """
    manifests = sorted((directory / CHECKSUMS_DIR).glob("rank-*.json"))
    if not manifests:
        raise CheckpointCorrupted(f"checkpoint {directory.name}: no checksum manifest")
    for manifest in manifests:
        try:
            files = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointCorrupted(
                f"checkpoint {directory.name}: unreadable manifest {manifest.name}: {exc}"
            ) from None
        for name, expected in files.items():
            path = directory / name
            if not path.is_file():
                raise CheckpointCorrupted(f"checkpoint {directory.name}: {name} is missing")
            size = path.stat().st_size
            if size != expected["bytes"] or _sha256(path) != expected["sha256"]:
                raise CheckpointCorrupted(
                    f"checkpoint {directory.name}: {name} is corrupted (SHA-256 mismatch; "
                    f"{size} bytes, expected {expected['bytes']}); refusing to resume from it"
                )


def _check_resumable(meta: dict[str, Any], spec: JobSpec, world: int) -> None:
    if meta["engine"] != spec.sharding.engine:
        raise RuntimeError(
            f"checkpoint was written by engine {meta['engine']!r}; the spec asks for "
            f"{spec.sharding.engine!r}"
        )
    if meta["engine"] == "deepspeed" and meta["world_size"] != world:
        raise RuntimeError(
            f"a DeepSpeed checkpoint saved with {meta['world_size']} workers cannot resume on "
            f"{world}; use engine 'native' to change num_workers"
        )


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _load_rng(directory: Path, rank: int, world: int, meta: dict[str, Any], spec: JobSpec) -> None:
    path = directory / "rng" / f"rank-{rank}.pt"
    if meta["world_size"] == world and path.exists():
        state = torch.load(path, weights_only=False)
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        return
    # Another world size: derive a fresh, still deterministic, per-rank stream.
    torch.manual_seed(resume_seed(spec.training.seed, rank, meta["step"]))


def _device(spec: JobSpec) -> torch.device:
    if spec.scaling.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _broadcast(value: Any) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
