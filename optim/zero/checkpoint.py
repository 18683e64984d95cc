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
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from optim.zero.zero_optimizer import ZeroOptimizer

__all__ = [
    "CheckpointError",
    "consolidated_state_dict",
    "load",
    "load_consolidated_state_dict",
    "save",
]

FORMAT_VERSION = 1
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
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} is not supported (expected {FORMAT_VERSION})"
        )
    return manifest


# --------------------------------------------------------------- metadata


def _hyperparams(group: dict[str, Any]) -> dict[str, Any]:
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


def _restore_hyperparams(opt: ZeroOptimizer, groups: list[dict[str, Any]]) -> None:
    for group, saved in zip(opt.param_groups, groups, strict=True):
        for key, value in saved.items():
            if key == "params" or key not in group:
                continue
            current = group[key]
            if isinstance(current, torch.Tensor):
                current.fill_(value)
            elif isinstance(current, tuple):
                group[key] = tuple(value)
            else:
                group[key] = value
    opt._mu_chains = [[] for _ in opt.param_groups]


def _shapes(opt: ZeroOptimizer) -> list[list[int]]:
    """Shapes of the trainable parameters in logical order."""
    slots = sorted(opt.layout.slots, key=lambda s: s.logical_start)
    return [list(s.shape) for s in slots]


def _steps_by_logical(opt: ZeroOptimizer) -> list[int]:
    order = sorted(range(len(opt.layout.slots)), key=lambda i: opt.layout.slots[i].logical_start)
    return [opt._steps[i] for i in order]


# ---------------------------------------------------------------- save/load


def save(opt: ZeroOptimizer, directory: str | os.PathLike[str]) -> None:
    """Collective: every rank writes its shard; rank 0 writes the manifest last."""
    root = Path(directory)
    comm = opt.comm
    error = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        if comm.rank == 0:
            (root / MANIFEST).unlink(missing_ok=True)  # the old checkpoint stops being valid
    except OSError as e:
        error = f"rank {comm.rank}: cannot prepare {root}: {e}"
    _raise_if_any(opt, error)

    runs = opt.layout.logical_runs(comm.rank)
    names = opt.algorithm.state_names
    payload: dict[str, Any] = {"runs": [[lo, hi] for _, _, lo, hi in runs]}
    for k, name in enumerate(names):
        payload[name] = [
            opt._state[b][k][s : s + hi - lo].to("cpu", copy=True) for b, s, lo, hi in runs
        ]
    payload["master"] = [
        None if opt._master[b] is None else opt._master[b][s : s + hi - lo].to("cpu", copy=True)
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
    _raise_if_any(opt, error)

    entry = {
        "name": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "runs": payload["runs"],
    }
    files = comm.all_gather_object(entry)
    if comm.rank == 0:
        manifest = {
            "format": FORMAT_VERSION,
            "algorithm": opt.algorithm.name,
            "world_size": comm.world_size,
            "logical_numel": opt.layout.logical_numel,
            "shapes": _shapes(opt),
            "steps": _steps_by_logical(opt),
            "skipped_steps": opt.skipped_steps,
            "param_groups": [_hyperparams(g) for g in opt.param_groups],
            "files": files,
        }
        try:
            atomic_write(root / MANIFEST, json.dumps(manifest, indent=1).encode())
            error = None
        except OSError as e:
            error = f"rank 0: cannot write {root / MANIFEST}: {e}"
    _raise_if_any(opt, error)


def _raise_if_any(opt: ZeroOptimizer, error: str | None) -> None:
    """Make a failure on one rank a failure on every rank (so no rank hangs)."""
    errors = [e for e in opt.comm.all_gather_object(error) if e]
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


def load(opt: ZeroOptimizer, directory: str | os.PathLike[str]) -> None:
    """Collective: load a checkpoint saved at any world size; all or nothing."""
    root = Path(directory)
    error = None
    result = None
    try:
        result = _load_local(opt, root)
    except CheckpointError as e:
        error = f"rank {opt.comm.rank}: {e}"
    _raise_if_any(opt, error)
    assert result is not None
    states, masters, manifest = result
    # Everything read and verified: commit.
    for b, pair in enumerate(states):
        for k in range(2):
            opt._state[b][k].copy_(pair[k])
    order = sorted(range(len(opt.layout.slots)), key=lambda i: opt.layout.slots[i].logical_start)
    for slot_id, step in zip(order, manifest["steps"], strict=True):
        opt._steps[slot_id] = int(step)
    opt._skipped_steps = int(manifest["skipped_steps"])
    _restore_hyperparams(opt, manifest["param_groups"])
    opt.refresh_master()
    for b, master in enumerate(masters):
        if master is not None and opt._master[b] is not None:
            opt._master[b].copy_(master)


def _load_local(opt: ZeroOptimizer, root: Path):
    manifest = _read_manifest(root)
    if manifest["algorithm"] != opt.algorithm.name:
        raise CheckpointError(
            f"{root}: saved by a {manifest['algorithm']} optimizer, this one is {opt.algorithm.name}"
        )
    if manifest["shapes"] != _shapes(opt) or len(manifest["param_groups"]) != len(opt.param_groups):
        raise CheckpointError(
            f"{root}: saved for trainable parameter shapes {manifest['shapes']} in "
            f"{len(manifest['param_groups'])} group(s); this optimizer has {_shapes(opt)} in "
            f"{len(opt.param_groups)}"
        )
    mine = opt.layout.logical_runs(opt.comm.rank)
    states = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in opt._state]
    masters = [None if m is None else torch.zeros_like(m) for m in opt._master]
    need_master = any(m is not None for m in masters)
    names = opt.algorithm.state_names
    sources: dict[str, list[tuple[int, int, torch.Tensor]]] = {n: [] for n in (*names, "master")}
    my_ranges = sorted((lo, hi) for _, _, lo, hi in mine)
    for entry in manifest["files"]:
        runs = entry["runs"]
        if not any(_overlaps(lo, hi, my_ranges) for lo, hi in runs):
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
        targets = [
            (lo, hi, masters[b][s : s + hi - lo]) for b, s, lo, hi in mine if masters[b] is not None
        ]
        _copy_ranges(targets, sources["master"], "the fp32 master parameters")
    else:
        masters = [None] * len(masters)  # fall back to the current parameters
    return states, masters, manifest


def _overlaps(lo: int, hi: int, ranges: list[tuple[int, int]]) -> bool:
    return any(r_lo < hi and lo < r_hi for r_lo, r_hi in ranges)


# ------------------------------------------------------ torch.optim format


def _full_state(opt: ZeroOptimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every flat buffer's full state, all-gathered bucket by bucket (collective)."""
    full = []
    handles = []
    for b, buf in enumerate(opt.layout.buffers):
        pair = tuple(torch.zeros(buf.numel, dtype=s.dtype, device=s.device) for s in opt._state[b])
        for bucket_id in buf.buckets:
            bucket = opt.layout.buckets[bucket_id]
            lo, hi = opt._pieces[bucket_id]
            for k in range(2):
                pair[k][lo:hi].copy_(opt._state_pieces(bucket)[k])
                handles.append(opt.comm.gather_bucket(pair[k][bucket.start : bucket.end], pair[k][lo:hi]))
        full.append(pair)
    for h in handles:
        h.wait()
    return full


def consolidated_state_dict(opt: ZeroOptimizer) -> dict[str, Any]:
    """A ``torch.optim.Adamax`` / ``NAdam`` state dict on every rank (collective)."""
    full = _full_state(opt)
    names = opt.algorithm.state_names
    state: dict[int, dict[str, torch.Tensor]] = {}
    for s, slot in enumerate(opt.layout.slots):
        step = opt._steps[s]
        if step == 0:
            continue  # torch creates state lazily, on a parameter's first update
        entry: dict[str, torch.Tensor] = {"step": torch.tensor(float(step))}
        if opt.algorithm.name == "nadam":
            entry["mu_product"] = opt._mu_product(slot.group, step).clone()
        for k, name in enumerate(names):
            flat = full[slot.buffer][k][slot.start : slot.start + slot.numel]
            entry[name] = flat.view(slot.shape).clone()
        state[slot.index] = entry
    groups = []
    index = 0
    for group in opt.param_groups:
        saved = {k: v for k, v in group.items() if k != "params"}
        saved["params"] = list(range(index, index + len(group["params"])))
        index += len(group["params"])
        groups.append(saved)
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_consolidated_state_dict(opt: ZeroOptimizer, state_dict: dict[str, Any]) -> None:
    """Load a ``torch.optim`` state dict: each rank copies its shard (not collective)."""
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"state_dict: missing key {key!r} (expected a torch.optim state dict)")
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"state_dict.param_groups: has {len(groups)} group(s), this optimizer has "
            f"{len(opt.param_groups)}"
        )
    for i, (saved, group) in enumerate(zip(groups, opt.param_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"state_dict.param_groups[{i}].params: has {len(saved['params'])} parameters, "
                f"this optimizer's group has {len(group['params'])}"
            )
    # Map torch's indices (the saved groups' order) to ours: same order, group by group.
    saved_index = [idx for g in groups for idx in g["params"]]
    names = opt.algorithm.state_names
    new_states = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in opt._state]
    new_steps = list(opt._steps)
    for s, slot in enumerate(opt.layout.slots):
        entry = state_dict["state"].get(saved_index[slot.index])
        if entry is None:
            new_steps[s] = 0
            continue
        for name in ("step", *names):
            if name not in entry:
                raise ValueError(f"state_dict.state[{saved_index[slot.index]}]: missing {name!r}")
            if name != "step" and tuple(entry[name].shape) != slot.shape:
                raise ValueError(
                    f"state_dict.state[{saved_index[slot.index]}].{name}: shape "
                    f"{tuple(entry[name].shape)} does not match the parameter's {slot.shape}"
                )
        new_steps[s] = int(float(entry["step"]))
    for s, slot in enumerate(opt.layout.slots):
        if new_steps[s] == 0:
            continue
        entry = state_dict["state"][saved_index[slot.index]]
        flat = [entry[name].reshape(-1) for name in names]
        for seg in opt._segments:
            if seg.slot != s:
                continue
            a = seg.flat_lo - slot.start
            for k in range(2):
                new_states[seg.buffer][k][seg.shard_lo : seg.shard_lo + seg.numel].copy_(
                    flat[k][a : a + seg.numel]
                )
    for b, pair in enumerate(new_states):
        for k in range(2):
            opt._state[b][k].copy_(pair[k])
    opt._steps = new_steps
    _restore_hyperparams(opt, [{k: v for k, v in g.items() if k != "params"} for g in groups])
    opt.refresh_master()
