"""Sharded, atomic, checksummed ZeroOptimizer checkpoints that load at any world size.

A checkpoint directory holds one ``shard-RRRRR-of-NNNNN.pt`` per rank (that
rank's state, addressed by *logical* element ranges, see ``layout``) and a
``manifest.json`` written by rank 0 after every shard is on disk. Each file is
written to a temporary name, fsynced, renamed into place and the directory
fsynced, so a crash leaves either the old file or the new one. The manifest
carries each shard's SHA-256 and size: a torn or corrupted shard is reported
with ``CheckpointError``, never loaded. A directory without a manifest is an
incomplete checkpoint.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from zerotrain.optim.zero.shard import ShardedState

__all__ = ["CheckpointError", "load", "restore_hyperparams", "save", "saved_hyperparams"]

FORMAT_VERSION = 2
"""2: adds each parameter's Nadam ``mu_product`` (carried state, never recomputed)."""
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit this optimizer."""


# ----------------------------------------------------------------- file I/O


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_verified(path: Path, sha256: str, size: int) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard listed in the manifest is missing") from None
    if len(data) != size:
        raise CheckpointError(
            f"{path}: size {len(data)} bytes, manifest says {size}: the file is torn or corrupted"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CheckpointError(
            f"{path}: SHA-256 {digest} does not match the manifest's {sha256}: "
            "the file is corrupted"
        )
    return data


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} not found: {directory} is not a checkpoint or its save did not finish"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}): the manifest is corrupted") from None
    if manifest.get("format") == 1 and manifest.get("algorithm") == "adamax":
        return manifest  # Adamax's state did not change from format 1
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} is not supported (expected "
            f"{FORMAT_VERSION}; a format 1 Nadam checkpoint lacks its mu_product state)"
        )
    return manifest


# --------------------------------------------------------------- metadata


def saved_hyperparams(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's hyperparameters as JSON values (tensors as numbers, tuples as lists)."""
    out: dict[str, Any] = {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, torch.Tensor):
            value = value.item()
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def restore_hyperparams(groups: list[dict[str, Any]], saved: list[dict[str, Any]]) -> None:
    """Set each group's hyperparameters from ``saved`` (keys the group does not have are ignored)."""
    for group, values in zip(groups, saved, strict=True):
        for key, value in values.items():
            if key == "params" or key not in group:
                continue
            current = group[key]
            if isinstance(current, torch.Tensor):
                current.fill_(value)
            elif isinstance(current, tuple):
                group[key] = tuple(value)
            else:
                group[key] = value


def _logical_order(shard: ShardedState) -> list[int]:
    """Slot ids in logical (world-size independent) order."""
    slots = shard.layout.slots
    return sorted(range(len(slots)), key=lambda i: slots[i].logical_start)


# ---------------------------------------------------------------- save/load


def save(shard: ShardedState, groups: list[dict[str, Any]], skipped_steps: int,
         directory: str | os.PathLike[str]) -> None:  # fmt: skip
    """Collective: every rank writes its shard; rank 0 writes the manifest last."""
    root = Path(directory)
    comm = shard.comm
    error = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        if comm.rank == 0:
            (root / MANIFEST).unlink(missing_ok=True)  # the old checkpoint stops being valid
    except OSError as e:
        error = f"rank {comm.rank}: cannot prepare {root}: {e}"
    _raise_if_any(comm, error)

    runs = shard.layout.logical_runs(comm.rank)
    payload: dict[str, Any] = {"runs": [[lo, hi] for _, _, lo, hi in runs]}
    for k, name in enumerate(shard.algorithm.state_names):
        payload[name] = [shard.state[b][k][s : s + hi - lo].to("cpu", copy=True)
                         for b, s, lo, hi in runs]  # fmt: skip
    payload["master"] = [
        None if (m := shard.master[b]) is None else m[s : s + hi - lo].to("cpu", copy=True)
        for b, s, lo, hi in runs
    ]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    name = f"shard-{comm.rank:05d}-of-{comm.world_size:05d}.pt"
    try:
        atomic_write(root / name, data)
        error = None
    except OSError as e:
        error = f"rank {comm.rank}: cannot write {root / name}: {e}"
    _raise_if_any(comm, error)

    entry = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
             "runs": payload["runs"]}  # fmt: skip
    files = comm.all_gather_object(entry)
    if comm.rank == 0:
        order = _logical_order(shard)
        manifest = {
            "format": FORMAT_VERSION,
            "algorithm": shard.algorithm.name,
            "world_size": comm.world_size,
            "logical_numel": shard.layout.logical_numel,
            "shapes": [list(shard.layout.slots[i].shape) for i in order],
            "steps": [shard.steps[i] for i in order],
            # Exact: repr of a float (a float32 value is a float64 value) round-trips.
            "mu_products": [shard.mu_products[i] for i in order],
            "mu_dtype": str(shard.mu_dtype).removeprefix("torch."),
            "skipped_steps": skipped_steps,
            "param_groups": [saved_hyperparams(g) for g in groups],
            "files": files,
        }
        try:
            atomic_write(root / MANIFEST, json.dumps(manifest, indent=1).encode())
            error = None
        except OSError as e:
            error = f"rank 0: cannot write {root / MANIFEST}: {e}"
    _raise_if_any(comm, error)


def _raise_if_any(comm: Any, error: str | None) -> None:
    """Make a failure on one rank a failure on every rank (so no rank hangs)."""
    errors = [e for e in comm.all_gather_object(error) if e]
    if errors:
        raise CheckpointError("; ".join(str(e) for e in errors))


def _copy_ranges(
    targets: list[tuple[int, int, torch.Tensor]],
    sources: list[tuple[int, int, torch.Tensor]],
    what: str,
) -> None:
    """Copy logical ranges: each target ``(lo, hi, tensor)`` from overlapping sources."""
    sources = sorted(sources, key=lambda s: s[0])
    starts = [s[0] for s in sources]
    for lo, hi, dst in targets:
        covered = 0
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        while i < len(sources) and sources[i][0] < hi:
            s_lo, s_hi, src = sources[i]
            a, z = max(lo, s_lo), min(hi, s_hi)
            if a < z:
                dst[a - lo : z - lo].copy_(src[a - s_lo : z - s_lo])
                covered += z - a
            i += 1
        if covered != hi - lo:
            raise CheckpointError(f"checkpoint does not cover elements [{lo}, {hi}) of {what}")


def load(shard: ShardedState, groups: list[dict[str, Any]],
         directory: str | os.PathLike[str]) -> int:  # fmt: skip
    """Collective: load a checkpoint saved at any world size; all or nothing.

    Returns the saved count of skipped steps.
    """
    root = Path(directory)
    error = None
    result = None
    try:
        result = _load_local(shard, groups, root)
    except CheckpointError as e:
        error = f"rank {shard.comm.rank}: {e}"
    _raise_if_any(shard.comm, error)
    assert result is not None
    states, masters, manifest = result
    # Everything read and verified: commit.
    for pair, loaded in zip(shard.state, states, strict=True):
        for k in range(2):
            pair[k].copy_(loaded[k])
    order = _logical_order(shard)
    mu_products = manifest.get("mu_products", [1.0] * len(order))
    for slot_id, step, mu_product in zip(order, manifest["steps"], mu_products, strict=True):
        shard.steps[slot_id] = int(step)
        shard.mu_products[slot_id] = float(mu_product)
    shard.mu_dtype = getattr(torch, manifest.get("mu_dtype", "float32"))
    restore_hyperparams(groups, manifest["param_groups"])
    shard.refresh_master()
    for current, loaded_master in zip(shard.master, masters, strict=True):
        if loaded_master is not None and current is not None:
            current.copy_(loaded_master)
    return int(manifest["skipped_steps"])


def _load_local(shard: ShardedState, groups: list[dict[str, Any]], root: Path):
    manifest = _read_manifest(root)
    algorithm = shard.algorithm
    if manifest["algorithm"] != algorithm.name:
        raise CheckpointError(
            f"{root}: saved by a {manifest['algorithm']} optimizer, this one is {algorithm.name}"
        )
    shapes = [list(shard.layout.slots[i].shape) for i in _logical_order(shard)]
    if manifest["shapes"] != shapes or len(manifest["param_groups"]) != len(groups):
        raise CheckpointError(
            f"{root}: saved for trainable parameter shapes {manifest['shapes']} in "
            f"{len(manifest['param_groups'])} group(s); this optimizer has {shapes} in "
            f"{len(groups)}"
        )
    mine = shard.layout.logical_runs(shard.comm.rank)
    states = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in shard.state]
    masters = [None if m is None else torch.zeros_like(m) for m in shard.master]
    need_master = any(m is not None for m in masters)
    names = algorithm.state_names
    sources: dict[str, list[tuple[int, int, torch.Tensor]]] = {n: [] for n in (*names, "master")}
    my_ranges = sorted((lo, hi) for _, _, lo, hi in mine)
    for entry in manifest["files"]:
        if not any(_overlaps(lo, hi, my_ranges) for lo, hi in entry["runs"]):
            continue
        data = _read_verified(root / entry["name"], entry["sha256"], entry["bytes"])
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{root / entry['name']}: cannot be read ({e})") from None
        for key in (*names, "master"):
            for (lo, hi), tensor in zip(payload["runs"], payload[key], strict=True):
                if tensor is not None:
                    sources[key].append((lo, hi, tensor))
    for k, name in enumerate(names):
        targets = [(lo, hi, states[b][k][s : s + hi - lo]) for b, s, lo, hi in mine]
        _copy_ranges(targets, sources[name], name)
    if need_master and sources["master"]:
        targets = [(lo, hi, m[s : s + hi - lo]) for b, s, lo, hi in mine
                   if (m := masters[b]) is not None]  # fmt: skip
        _copy_ranges(targets, sources["master"], "the fp32 master parameters")
    else:
        masters = [None] * len(masters)  # fall back to the current parameters
    return states, masters, manifest


def _overlaps(lo: int, hi: int, ranges: list[tuple[int, int]]) -> bool:
    return any(r_lo < hi and lo < r_hi for r_lo, r_hi in ranges)
