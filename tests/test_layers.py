"""lmdeploy_patch's layers (lmdeploy_patch/README.md): every import, at
module level or inside a function, points to a lower layer; hook modules
never import each other; the import graph has no cycle; what an interpreter
imports at start (the .pth -> registry -> hooks) imports nothing heavy."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmdeploy_patch"

# layer -> modules. Within layer 0 (wiring utilities) and layer 5 (entry
# points) imports may go sideways (acyclic); everywhere else only down.
LAYERS: dict[int, set[str]] = {
    0: {"patcher", "log", "import_hooks", "compat", "hook"},
    1: {"settings"},
    2: {"eligibility", "copy_plan", "lost_hits", "histogram", "restore_decision", "continuations", "slot_ledger", "cache_salt",
        "faults", "fallback_copy", "store_keys", "store_link"},
    3: {"scheduler_tier", "rank_tier", "pool_sizing", "config_fields", "cli_flags", "turbomind_fallback",
        "metrics_export", "store_tier"},
    4: {"hooks." + p.stem for p in (PACKAGE / "hooks").glob("*.py") if p.stem != "__init__"} | {"hooks"},
    5: {"registry", "_activate", ""},  # "" is the package's __init__
}
HEAVY = ("lmdeploy", "torch", "numpy", "lmdeploy_hostcache", "prometheus_client")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(lmdeploy_patch modules imported anywhere, top-level modules imported at module level)."""
    name = module_name(path)
    package = name.rsplit(".", 1)[0] if "." in name else ""
    if path.name == "__init__.py":
        package = name
    tree = ast.parse(path.read_text())
    ours, module_level = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
                found = {f"{target}.{a.name}".strip(".") for a in node.names} if not node.module else {target}
                ours |= {t for t in found}
            elif node.module and node.module.split(".")[0] == "lmdeploy_patch":
                base = node.module.removeprefix("lmdeploy_patch").strip(".")
                ours |= {base} | {f"{base}.{a.name}".strip(".") for a in node.names}
        elif isinstance(node, ast.Import):
            ours |= {a.name.removeprefix("lmdeploy_patch").strip(".") for a in node.names
                     if a.name.split(".")[0] == "lmdeploy_patch"}
    for node in tree.body:
        if isinstance(node, ast.Import):
            module_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            module_level.add(node.module.split(".")[0])
    return ours, module_level


def layer_of(module: str) -> int:
    for layer, names in LAYERS.items():
        if module in names:
            return layer
    raise AssertionError(f"lmdeploy_patch.{module or '__init__'} is in no layer of tests/test_layers.py: add it")


def is_module(name: str) -> bool:
    path = PACKAGE / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        mod = module_name(path)
        ours, _ = imports_of(path)
        # `from . import x` names a module when x is one; the package itself ("") is the entry point
        out[mod] = {m for m in ours if m and m != mod and is_module(m)}
    return out


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        for dep in deps:
            lm, ld = layer_of(mod), layer_of(dep)
            if ld > lm or (ld == lm and lm not in (0, 5)):
                bad.append(f"lmdeploy_patch.{mod} (layer {lm}) imports lmdeploy_patch.{dep} (layer {ld})")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        for dep in g.get(node, ()):
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in g:
        if node not in state:
            visit(node, [node])
    return found


def test_every_import_points_down():
    assert violations(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_can_fail():
    """Negative control: an upward import, a sideways hook import and a cycle are each caught."""
    g = graph()
    g["settings"] = g["settings"] | {"scheduler_tier"}
    g["hooks.engine"] = g["hooks.engine"] | {"hooks.model_agent"}
    assert any("settings (layer 1) imports lmdeploy_patch.scheduler_tier" in v for v in violations(g))
    assert any("hooks.engine (layer 4) imports lmdeploy_patch.hooks.model_agent" in v for v in violations(g))
    g["compat"] = g["compat"] | {"hook"}
    assert cycles(g)


def module_level_imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level names imported, lmdeploy_patch modules imported) by what runs
    when the module is imported: its body, try/if/with blocks included, not
    function or class bodies."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else (name.rsplit(".", 1)[0] if "." in name else "")
    external, ours = set(), set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    (ours.add(a.name.removeprefix("lmdeploy_patch").strip("."))
                     if a.name.split(".")[0] == "lmdeploy_patch" else external.add(a.name.split(".")[0]))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join([*base, node.module] if node.module else base)
                    ours.update({target} | {f"{target}.{a.name}".strip(".") for a in node.names})
                elif node.module and node.module.split(".")[0] == "lmdeploy_patch":
                    base = node.module.removeprefix("lmdeploy_patch").strip(".")
                    ours.update({base} | {f"{base}.{a.name}".strip(".") for a in node.names})
                elif node.module:
                    external.add(node.module.split(".")[0])
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    visit(inner)

    visit(ast.parse(path.read_text()).body)
    return external, {m for m in ours if is_module(m)}


def loaded_at_start() -> set[str]:
    """Every lmdeploy_patch module an interpreter imports at start: the .pth's
    _activate, registry, each hook module it lists, and what they import."""
    from lmdeploy_patch.registry import HOOK_MODULES

    todo = ["_activate", "registry", "hooks"] + [f"hooks.{m}" for m in HOOK_MODULES]
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = PACKAGE / (mod.replace(".", "/") + ".py")
        path = path if path.exists() else PACKAGE / mod.replace(".", "/") / "__init__.py"
        todo += sorted(module_level_imports(path)[1] | ({""} if mod else set()))
    return seen


def test_what_loads_at_interpreter_start_imports_nothing_heavy():
    start = loaded_at_start()
    assert {"registry", "hook", "settings", "hooks.scheduler"} <= start, sorted(start)
    for mod in sorted(start):
        path = PACKAGE / (mod.replace(".", "/") + ".py") if mod else PACKAGE / "__init__.py"
        path = path if path.exists() else PACKAGE / mod.replace(".", "/") / "__init__.py"
        heavy = module_level_imports(path)[0] & set(HEAVY)
        assert not heavy, f"lmdeploy_patch.{mod or '__init__'} imports {heavy} when it is imported"


def test_a_fresh_interpreter_loads_nothing_heavy():
    """At run time too: with the hooks registered (the .pth), nothing heavy is
    in sys.modules after start that the disabled integration would not load."""
    import os
    import subprocess
    import sys

    code = "import sys; print(' '.join(sorted(sys.modules)))"
    env = {k: v for k, v in os.environ.items() if k != "LMDEPLOY_HOSTCACHE_DISABLE"}
    on = set(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True).stdout.split())
    off = set(subprocess.run([sys.executable, "-c", code], env=dict(env, LMDEPLOY_HOSTCACHE_DISABLE="1"),
                             capture_output=True, text=True, check=True).stdout.split())
    assert "lmdeploy_patch.registry" in on, "the .pth did not run: is the package installed?"
    added = {m.split(".")[0] for m in on - off}
    assert not added & (set(HEAVY) | {"inspect"}), sorted(on - off)


def test_every_hook_module_is_registered():
    from lmdeploy_patch.registry import HOOK_MODULES

    files = {p.stem for p in (PACKAGE / "hooks").glob("*.py") if p.stem != "__init__"}
    assert set(HOOK_MODULES) == files, (set(HOOK_MODULES) ^ files)


def test_the_core_does_not_know_the_integration():
    core = PACKAGE.parent / "python" / "lmdeploy_hostcache"
    for path in core.glob("*.py"):
        assert "lmdeploy_patch" not in path.read_text(), path
