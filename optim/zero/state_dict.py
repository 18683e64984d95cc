"""ZeroOptimizer state in ``torch.optim``'s state-dict format, and back.

A consolidated state dict is exactly what ``torch.optim.Adamax`` / ``NAdam``
would hold for the same parameters: per parameter index ``step``, Nadam's
``mu_product`` (in torch's scalar dtype) and the two moment tensors, and the
param groups. It is assembled from every rank's shard (a collective) and can be
loaded by either side.
"""

from __future__ import annotations

from typing import Any

import torch

from zerotrain.optim.zero.checkpoint import restore_hyperparams
from zerotrain.optim.zero.shard import ShardedState

__all__ = ["consolidated_state_dict", "load_consolidated_state_dict"]


def _full_state(shard: ShardedState) -> list[tuple[torch.Tensor, ...]]:
    """Every flat buffer's full state, all-gathered bucket by bucket (collective)."""
    full, handles = [], []
    for b, buf in enumerate(shard.layout.buffers):
        pair = tuple(torch.zeros(buf.numel, dtype=s.dtype, device=s.device) for s in shard.state[b])
        for bucket_id in buf.buckets:
            bucket = shard.layout.buckets[bucket_id]
            lo, hi = shard.pieces[bucket_id]
            for k, piece in enumerate(shard.state_pieces(bucket)):
                pair[k][lo:hi].copy_(piece)
                handles.append(
                    shard.comm.gather_bucket(pair[k][bucket.start : bucket.end], pair[k][lo:hi])
                )
        full.append(pair)
    for handle in handles:
        handle.wait()
    return full


def consolidated_state_dict(shard: ShardedState, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``torch.optim.Adamax`` / ``NAdam`` state dict (collective: every rank must call it)."""
    full = _full_state(shard)
    names = shard.algorithm.state_names
    state: dict[int, dict[str, torch.Tensor]] = {}
    for s, slot in enumerate(shard.layout.slots):
        step = shard.steps[s]
        if step == 0:
            continue  # torch creates state lazily, on a parameter's first update
        entry: dict[str, torch.Tensor] = {"step": torch.tensor(float(step))}
        if shard.algorithm.name == "nadam":
            entry["mu_product"] = torch.tensor(shard.mu_products[s], dtype=shard.mu_dtype)
        for k, name in enumerate(names):
            flat = full[slot.buffer][k][slot.start : slot.start + slot.numel]
            entry[name] = flat.view(slot.shape).clone()
        state[slot.index] = entry
    saved_groups = []
    index = 0
    for group in groups:
        saved = {k: v for k, v in group.items() if k != "params"}
        saved["params"] = list(range(index, index + len(group["params"])))
        index += len(group["params"])
        saved_groups.append(saved)
    return {"state": dict(sorted(state.items())), "param_groups": saved_groups}


def load_consolidated_state_dict(
    shard: ShardedState, groups: list[dict[str, Any]], state_dict: dict[str, Any]
) -> None:
    """Load a ``torch.optim`` state dict: each rank copies its shard (not a collective).

    Validates everything before changing anything.
    """
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"state_dict: missing key {key!r} (expected a torch.optim state dict)")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"state_dict.param_groups: has {len(saved_groups)} group(s), this optimizer has "
            f"{len(groups)}"
        )
    for i, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"state_dict.param_groups[{i}].params: has {len(saved['params'])} parameters, "
                f"this optimizer's group has {len(group['params'])}"
            )
    # torch's indices (the saved groups' order) map to ours: same order, group by group.
    saved_index = [idx for g in saved_groups for idx in g["params"]]
    names = shard.algorithm.state_names
    required = ("step", "mu_product", *names) if shard.algorithm.name == "nadam" else ("step", *names)
    entries: dict[int, dict[str, Any]] = {}
    for s, slot in enumerate(shard.layout.slots):
        index = saved_index[slot.index]
        entry = state_dict["state"].get(index)
        if entry is None:
            continue
        for name in required:
            if name not in entry:
                raise ValueError(f"state_dict.state[{index}]: missing {name!r}")
        for name in names:
            if tuple(entry[name].shape) != slot.shape:
                raise ValueError(
                    f"state_dict.state[{index}].{name}: shape {tuple(entry[name].shape)} does "
                    f"not match the parameter's {slot.shape}"
                )
        entries[s] = entry

    new_states = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in shard.state]
    for seg in shard.segments:
        entry = entries.get(seg.slot)
        if entry is None:
            continue
        a = seg.flat_lo - shard.layout.slots[seg.slot].start
        for k, name in enumerate(names):
            source = entry[name].reshape(-1)[a : a + seg.numel]
            new_states[seg.buffer][k][seg.shard_lo : seg.shard_lo + seg.numel].copy_(source)
    for pair, loaded in zip(shard.state, new_states, strict=True):
        for k in range(2):
            pair[k].copy_(loaded[k])
    for s in range(len(shard.layout.slots)):
        entry = entries.get(s)
        shard.steps[s] = 0 if entry is None else int(float(entry["step"]))
        if entry is not None and "mu_product" in entry:
            mu_product = entry["mu_product"]
            shard.mu_products[s] = float(mu_product)
            if isinstance(mu_product, torch.Tensor):
                shard.mu_dtype = mu_product.dtype
        else:
            shard.mu_products[s] = 1.0
    restore_hyperparams(groups, [{k: v for k, v in g.items() if k != "params"} for g in saved_groups])
    shard.refresh_master()
