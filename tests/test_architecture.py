"""The house rules of ``optim/`` and ``service/``, checked on the source with ``ast``.

* No import cycle between modules. Every import counts: module level,
  function level and ``if TYPE_CHECKING:`` alike, because a cycle hidden in a
  function or behind a type check is still two rooms that need each other.
* No module over :data:`MAX_LINES` lines, except generated code in ``service/api``.
* ``optim`` is pure maths plus sharding: it never imports the service, Ray or gRPC.
* Protobuf stays at the edge: only the modules of :data:`API_EDGE` import the
  generated code (``zerotrain.service.api``); everything else, the job manager
  and ``trainctl`` included, works on the domain types.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optim", "service")
MAX_LINES = 450
GENERATED = ROOT / "service" / "api" / "zerotrain"
"""``make generate`` output (protobuf and gRPC stubs): exempt from the size rule."""


API = "zerotrain.service.api"
API_EDGE = frozenset(
    {
        "zerotrain.service.convert",  # protobuf <-> domain, both directions
        "zerotrain.service.servicer",  # requests in, replies out
        "zerotrain.service.server",  # registers the servicer on a grpc.Server
        "zerotrain.service.client",  # JobClient: stubs inside, domain types out
        "zerotrain.service.ingest_client",  # GrpcSink: the workers' ReportMetrics client
    }
)
"""The modules of ``zerotrain.service`` (besides ``zerotrain.service.api`` itself) that may
import the generated protobuf and gRPC code."""


def _modules() -> dict[str, Path]:
    """Dotted module name (``zerotrain.optim.zero``) -> file, for every module of the packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(["zerotrain", *parts])] = path  # as installed
    return modules


MODULES = _modules()


def _imported_names(name: str, path: Path) -> Iterator[str]:
    """Every dotted name ``name``'s file imports, wherever the import statement stands."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from pkg import sub` imports the module pkg.sub when it exists.
                sub = f"{base}.{alias.name}"
                yield sub if sub in MODULES else base


def _internal_imports(name: str, path: Path) -> set[str]:
    """The modules of the packages that ``name`` imports (the nearest enclosing module)."""
    found = set()
    for imported in _imported_names(name, path):
        while imported and imported not in MODULES:
            imported = imported.rpartition(".")[0]
        if imported and imported != name:
            found.add(imported)
    return found


GRAPH = {name: _internal_imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_every_kind_of_import():
    """The walker is not blind: known function-level and TYPE_CHECKING imports are edges."""
    assert "zerotrain.service.spec" in GRAPH["zerotrain.service.model"]  # under `if TYPE_CHECKING:`
    assert (
        "zerotrain.service.metrics" in GRAPH["zerotrain.service.jobs"]
    )  # under `if TYPE_CHECKING:`
    assert (
        "zerotrain.service.runtime.trainer" in GRAPH["zerotrain.service.runtime.__main__"]
    )  # in a function
    assert (
        "zerotrain.optim.functional" in GRAPH["zerotrain.optim.adamax"]
    )  # `from zerotrain.optim import functional`


def test_cycle_detection_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles (counting function-level and TYPE_CHECKING imports): " + (
        "; ".join(" <-> ".join(c) for c in cycles)
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    path = MODULES[name]
    if GENERATED in path.parents:
        pytest.skip("generated code")
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, (
        f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_LINES}): split it along a seam"
    )


def test_optim_knows_nothing_of_the_service():
    forbidden = ("zerotrain.service", "ray", "grpc", "google.protobuf", "prometheus_client")
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith("zerotrain.optim"):
            continue
        for imported in _imported_names(name, path):
            if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders


def _api_importers(modules: dict[str, Path]) -> dict[str, list[str]]:
    """Module -> the names of ``zerotrain.service.api`` it imports (outside the api package)."""
    found = {}
    for name, path in modules.items():
        if name == API or name.startswith(API + "."):
            continue
        hits = sorted(
            {i for i in _imported_names(name, path) if i == API or i.startswith(API + ".")}
        )
        if hits:
            found[name] = hits
    return found


def test_protobuf_stays_at_the_edge():
    gone = API_EDGE - set(MODULES)
    assert not gone, f"API_EDGE names modules that are gone: {sorted(gone)}"
    offenders = {n: hits for n, hits in _api_importers(MODULES).items() if n not in API_EDGE}
    assert not offenders, (
        "generated protobuf code imported outside the edge (convert it with "
        f"zerotrain.service.convert, or use JobClient): {offenders}"
    )
