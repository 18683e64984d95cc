"""Generate the Python protobuf/gRPC code from ``protos/`` (``make generate``).

``python -m zerotrain.service.api.generate`` compiles every ``protos/zerotrain/v1/*.proto``
with grpcio-tools into ``service/api/zerotrain/v1/``. The include path maps the
virtual prefix ``zerotrain/service/api`` (the installed package's path) onto
``protos/``, so protoc sees each file as
``zerotrain/service/api/zerotrain/v1/<name>.proto`` and writes package-absolute imports
(``from zerotrain.service.api.zerotrain.v1 import job_service_pb2``): no ``sys.path``
tricks and no post-processing of the generated files.

``python -m zerotrain.service.api.generate --check`` regenerates into a temporary
directory and exits 1 if the committed files differ (the drift check).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

__all__ = ["PACKAGE_DIR", "PROTO_DIR", "drifted_files", "generate", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "protos" / "zerotrain" / "v1"
PACKAGE_DIR = REPO_ROOT / "service" / "api" / "zerotrain" / "v1"
# Virtual include prefix: protoc's file names become zerotrain/service/api/zerotrain/v1/*.proto.
_VIRTUAL_PREFIX = "zerotrain/service/api"
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _proto_files() -> list[Path]:
    files = sorted(PROTO_DIR.glob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {PROTO_DIR}")
    return files


def generate(out_root: Path) -> list[Path]:
    """Compile the protos into ``out_root/zerotrain/service/api/zerotrain/v1``.

    Returns the generated files. Raises ``RuntimeError`` with protoc's exit code
    when compilation fails.
    """
    import grpc_tools
    from grpc_tools import protoc  # heavy import; only needed here

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    virtual = [
        f"{_VIRTUAL_PREFIX}/{p.relative_to(PROTO_DIR.parents[1]).as_posix()}"
        for p in _proto_files()
    ]
    args = [
        "grpc_tools.protoc",
        f"-I{_VIRTUAL_PREFIX}={PROTO_DIR.parents[1]}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *virtual,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    target = out_root / _VIRTUAL_PREFIX / "zerotrain" / "v1"
    return sorted(p for p in target.iterdir() if p.name.endswith(_GENERATED_SUFFIXES))


def _generated_names(directory: Path) -> set[str]:
    if not directory.is_dir():
        return set()
    return {p.name for p in directory.iterdir() if p.name.endswith(_GENERATED_SUFFIXES)}


# Stamps of the generator's own version, not of the .proto: a newer grpcio-tools
# writes different numbers here for the same schema, which is not drift.
_VERSION_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
        r"\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"
    ),
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
)


def _content(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    for stamp in _VERSION_STAMPS:
        text = stamp.sub("<generator version>", text)
    return text


def drifted_files(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Names of generated files in ``package_dir`` that differ from a fresh generation.

    Missing, extra and changed files all count; the generator's version stamps
    are ignored. Empty means up to date.
    """
    with tempfile.TemporaryDirectory(prefix="zerotrain-gen-") as tmp:
        fresh_dir = Path(tmp) / _VIRTUAL_PREFIX / "zerotrain" / "v1"
        generate(Path(tmp))
        fresh, committed = _generated_names(fresh_dir), _generated_names(package_dir)
        drifted = sorted(fresh ^ committed)
        for name in sorted(fresh & committed):
            if _content(fresh_dir / name) != _content(package_dir / name):
                drifted.append(name)
        return sorted(drifted)


def _install(package_dir: Path) -> list[Path]:
    """Generate into a temp dir, then move each file into place atomically."""
    package_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gen-", dir=package_dir) as tmp:
        generated = generate(Path(tmp))
        installed = []
        for path in generated:
            os.replace(path, package_dir / path.name)
            installed.append(package_dir / path.name)
    stale = _generated_names(package_dir) - {p.name for p in installed}
    for name in stale:
        (package_dir / name).unlink()
    return installed


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: generate, or ``--check`` for drift."""
    parser = argparse.ArgumentParser(
        prog="python -m zerotrain.service.api.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed code is out of date"
    )
    args = parser.parse_args(argv)
    if args.check:
        drifted = drifted_files()
        if drifted:
            print(
                f"generated code is out of date: {', '.join(drifted)}; run `make generate`",
                file=sys.stderr,
            )
            return 1
        print("generated code is up to date")
        return 0
    for path in _install(PACKAGE_DIR):
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
