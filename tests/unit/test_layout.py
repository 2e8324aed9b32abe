"""The package layout is a dependency rule: each layer imports only the ones below it, so a
module's path says what it may use. Every import statement counts, those inside functions
included (the CLIs import lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "agent/src/tracefleet/agent"
CONTROLLER = ROOT / "controller/src/tracefleet/controller"


def _imports(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (``from a import b``: a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _violations(package: Path, dotted: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for f in sorted(package.rglob("*.py")):
        for mod in sorted(_imports(f)):
            if any(mod == p or mod.startswith(p + ".") for p in forbidden):
                out.append(f"{dotted}/{f.relative_to(package)} imports {mod}")
    return out


# (package directory, its dotted name, what it must not import)
_C = "tracefleet.controller"
_A = "tracefleet.agent"
RULES = [
    # the operator CLI is separable from the server: it talks to it over the API only
    (CONTROLLER / "operator", "operator",
     (f"{_C}.api", f"{_C}.domain", f"{_C}.storage", f"{_C}.server")),
    (CONTROLLER / "common", "common",
     (f"{_C}.api", f"{_C}.domain", f"{_C}.storage", f"{_C}.server", f"{_C}.operator")),
    (CONTROLLER / "storage", "storage", (f"{_C}.api", f"{_C}.server", f"{_C}.operator")),
    (CONTROLLER / "domain", "domain", (f"{_C}.api", f"{_C}.server", f"{_C}.operator")),
    (AGENT / "kernel", "kernel",
     (f"{_A}.capture", f"{_A}.control", f"{_A}.export", f"{_A}.metrics", f"{_A}.cli")),
    (AGENT / "capture", "capture",
     (f"{_A}.control", f"{_A}.export", f"{_A}.metrics", f"{_A}.cli")),
    (AGENT / "control", "control", (f"{_A}.export", f"{_A}.metrics", f"{_A}.cli")),
    # the load generator is a test tool: nothing shipped imports it
    (AGENT, "agent", ("tests",)),
    (CONTROLLER, "controller", ("tests", "tracefleet.agent")),
]  # fmt: skip


@pytest.mark.parametrize("package,name,forbidden", RULES, ids=[r[1] for r in RULES])
def test_layer_imports_only_below(package: Path, name: str, forbidden: tuple[str, ...]):
    assert package.is_dir(), f"{package} is gone: update RULES with the layout"
    assert list(package.rglob("*.py")), f"{package} has no modules"
    assert not _violations(package, name, forbidden)


def test_the_rule_sees_a_lazy_import(tmp_path: Path):
    # the check itself: an import inside a function is found
    (tmp_path / "m.py").write_text("def f():\n    from tracefleet.controller.domain import x\n")
    assert _violations(tmp_path, "t", (f"{_C}.domain",)) == [
        "t/m.py imports tracefleet.controller.domain",
        "t/m.py imports tracefleet.controller.domain.x",
    ]


def test_source_checkout_finds_its_own_bpf_objects():
    # hostcheck finds build/bpf from its own path in a checkout: moving the module deeper
    # must move this too (else the agent falls back to /usr/lib and says "no objects")
    from tracefleet.agent.kernel import hostcheck

    assert hostcheck.SOURCE_BPF_DIR == ROOT / "build" / "bpf"
