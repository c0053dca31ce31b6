"""The floors (docs/architecture.md): a module of rlpt imports only from its own floor or the floors below,
and within one floor without a cycle. Every import counts, the ones inside functions too: a lazy import is
still a dependency, and an upward one is how a framework ends up knowing its plugins."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# where -> floor; a folder entry covers every module under it (examples/, bench/, tests/ are outside rlpt)
FLOORS = {
    "rlpt/__init__.py": 0, "rlpt/config.py": 0, "rlpt/validate.py": 0, "rlpt/checkpoint.py": 0, "rlpt/run.py": 0,
    "rlpt/lock.py": 0, "rlpt/errors.py": 0, "rlpt/loop.py": 0, "rlpt/optim.py": 0, "rlpt/report.py": 0, "rlpt/perf/": 0,
    "rlpt/gpt_mini/": 1, "rlpt/models/": 1,
    "rlpt/engine/": 2,
    "rlpt/framework/": 3,
    "rlpt/algorithms/": 4, "rlpt/envs/": 4, "rlpt/preference/": 4, "rlpt/search/": 4,
    "rlpt/data/": 4,
    "rlpt/systems/": 5,
    "rlpt/sft.py": 6, "rlpt/train.py": 6, "rlpt/pipeline.py": 6, "rlpt/recipe.py": 6, "rlpt/stages.py": 6,
    "rlpt/compare.py": 6,
    "rlpt/cli.py": 6, "rlpt/eval_cmd.py": 6,
    "rlpt/lab/": 6, "rlpt/hf_policy.py": 6, "rlpt/text_stages.py": 6,
}


def floor_of(path: str) -> int | None:
    """A module's floor by its path under the repository ('rlpt/engine/llm.py' -> 2); None if it has none."""
    if path in FLOORS:
        return FLOORS[path]
    folders = [f for f in FLOORS if f.endswith("/") and path.startswith(f)]
    return FLOORS[max(folders, key=len)] if folders else None


def module_path(name: str) -> str | None:
    """'rlpt.framework.algorithm' -> 'rlpt/framework/algorithm.py' (a package: its __init__.py); None if
    no such file (then it is a name inside the module above it, e.g. `from rlpt import config` is a module,
    `from rlpt.config import load_config` is not)."""
    base = ROOT / name.replace(".", "/")
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p.relative_to(ROOT).as_posix()
    return None


def rlpt_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module file) for every import of an rlpt module in `path`, at any depth of the code."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from rlpt.algorithms import grpo` imports the module rlpt/algorithms/grpo.py
            names = [f"{node.module}.{a.name}" if module_path(f"{node.module}.{a.name}") else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "rlpt" or name.startswith("rlpt."):
                target = module_path(name)
                assert target is not None, f"{path.relative_to(ROOT)}:{node.lineno} imports {name}: no such module"
                out.append((node.lineno, target))
    return sorted(set(out))


MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "rlpt").rglob("*.py"))


def test_every_module_has_a_floor():
    missing = [m for m in MODULES if floor_of(m) is None]
    assert not missing, "modules on no floor (add them to FLOORS here and to docs/architecture.md, or move them " \
                        "out of rlpt/, e.g. to examples/): " + ", ".join(missing)


def upward_imports(files: dict[str, Path]) -> list[str]:
    """'file:line (floor a) imports target (floor b)' for every import in `files` (module path -> file) with b > a."""
    bad = []
    for m, f in files.items():
        here = floor_of(m)
        for line, target in rlpt_imports(f):
            there = floor_of(target)
            if here is not None and there is not None and there > here:
                bad.append(f"{m}:{line} (floor {here}) imports {target} (floor {there})")
    return bad


def test_every_import_goes_to_the_same_floor_or_below():
    bad = upward_imports({m: ROOT / m for m in MODULES})
    assert not bad, "imports that go up a floor:\n  " + "\n  ".join(bad)


def test_no_cycle_within_a_floor():
    graph = {m: {t for _, t in rlpt_imports(ROOT / m) if t != m and floor_of(t) == floor_of(m)} for m in MODULES}
    cycles, done = [], set()

    def visit(m: str, stack: list[str]):
        if m in stack:
            cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in done:
            return
        for t in sorted(graph.get(m, ())):
            visit(t, stack + [m])
        done.add(m)

    for m in MODULES:
        visit(m, [])
    assert not cycles, "import cycles within a floor:\n  " + "\n  ".join(cycles)


@pytest.mark.parametrize("path, floor", [("rlpt/config.py", 0), ("rlpt/engine/llm.py", 2),
                                         ("rlpt/framework/algorithm.py", 3), ("rlpt/algorithms/ppo.py", 4),
                                         ("rlpt/train.py", 6), ("rlpt/nowhere.py", None)])
def test_floor_of(path, floor):
    assert floor_of(path) == floor


def test_imports_inside_functions_count(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom rlpt.config import load_config\n\n\ndef f():\n    import rlpt.algorithms\n"
                 "    from rlpt.framework import controller\n")
    assert rlpt_imports(f) == [(2, "rlpt/config.py"), (6, "rlpt/algorithms/__init__.py"),
                               (7, "rlpt/framework/controller.py")]
    # as a framework module: the lazy import of the algorithms goes up a floor and is named with its line
    assert upward_imports({"rlpt/framework/m.py": f}) == [
        "rlpt/framework/m.py:6 (floor 3) imports rlpt/algorithms/__init__.py (floor 4)"]
    assert upward_imports({"rlpt/train.py": f}) == []
