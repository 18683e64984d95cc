"""Where torch.compile keeps the fused optimizer kernels it builds for a job's workers.

Building the fused step costs ~15 s on a CPU the first time and ~2 s from the
on-disk cache, so workers should share one. The cache goes under the run
storage's root (``<storage>/.cache/inductor/<machine>``), a place every job of a
cluster shares; a URI storage keeps torch's node-local default. ``<machine>``
keys the cache by CPU model and features, ATEN_CPU_CAPABILITY, GPU model and
torch version: inductor's cache is not keyed by them, and an artifact built for
another vector width computes garbage (seen here with a shared cache). A cache
directory set by the user (``TORCHINDUCTOR_CACHE_DIR``) is left alone.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch

__all__ = ["machine_key", "use_shared_cache"]


def machine_key() -> str:
    """A short hash of what compiled kernels depend on, besides their source."""
    parts = [platform.machine(), torch.__version__, os.environ.get("ATEN_CPU_CAPABILITY", "")]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = [platform.processor()]
    parts += sorted({line for line in cpuinfo if line.startswith(("model name", "flags"))})
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def use_shared_cache(run_storage: str) -> str | None:
    """Point torch.compile's cache next to the runs of ``run_storage`` (``<root>/<job_id>``).

    Returns the directory used, or None where torch's default stays (a URI
    storage, or ``TORCHINDUCTOR_CACHE_DIR`` already set).
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "://" in run_storage or not run_storage:
        return None
    directory = Path(run_storage).parent / ".cache" / "inductor" / machine_key()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only storage root: torch's node-local default
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    return str(directory)
