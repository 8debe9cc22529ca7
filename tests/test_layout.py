"""The layout's rules, checked on the code: dvc.yaml's code deps are exact, there is no import
cycle, every module imports alone, `import tasks` has no side effects, no lower room imports a
higher one.

Imports are read from the source (ast), function-local ones included: a lazy import still runs
when the stage runs, so it is still a dependency, and a cycle hidden behind one is still a cycle.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("degradations", "models", "tasks", "flows")
# Lower rooms first: a module may import its own room and the ones before it, never a later one.
ROOMS = ("degradations", "models", "tasks.core", "tasks.data", "tasks.train", "tasks.evaluate", "tasks.registry",
         "tasks.release", "tasks.serve", "flows")


def module_file(name: str) -> Path | None:
    """The file of a project module (a .py file or a package's __init__.py), None otherwise."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[str]:
    return sorted(module_name(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def imports_in(tree: ast.AST, package: str = "") -> set[str]:
    """Project modules named by every import statement in `tree` (nested ones included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if module_file(name))
    return found


def loads_submodules(tree: ast.AST) -> bool:
    """A registry package (degradations/, models/adapters/) imports its modules by name at run
    time (importlib.import_module): it imports every module in its folder."""
    return any(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
               for node in ast.walk(tree))


def module_imports(name: str, dynamic: bool = True) -> set[str]:
    """Project modules `name` imports; with `dynamic`, a registry package counts as importing its
    whole folder (what a stage's deps need; the cycle check reads the import statements only)."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = imports_in(tree, package)
    if dynamic and path.name == "__init__.py" and loads_submodules(tree):
        found |= {module_name(p) for p in path.parent.glob("*.py") if p.name != "__init__.py"}
    return found


def is_docstring_only(name: str) -> bool:
    body = ast.parse(module_file(name).read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(module_imports(name) - seen)
    return seen


def entry_imports(func) -> set[str]:
    """Project modules a CLI command function imports, following the helpers of its own module
    that it calls (e.g. the CLI's params helper)."""
    module = inspect.getmodule(func)
    found, todo, done = set(), [func], set()
    while todo:
        current = todo.pop()
        if current in done:
            continue
        done.add(current)
        tree = ast.parse(textwrap.dedent(inspect.getsource(current)))
        found |= imports_in(tree, module.__name__.rpartition(".")[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callee = getattr(module, node.func.id, None)
                if inspect.isfunction(callee) and callee.__module__ == module.__name__:
                    todo.append(callee)
    return found


def stage_commands() -> dict[str, str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage["cmd"] for name, stage in stages.items()}


def code_deps(stage: dict) -> list[str]:
    return [dep for dep in stage.get("deps", []) if dep.split("/")[0] in PACKAGES]


def expected_files(func) -> set[str]:
    """The stage's code: every module reachable from its command function, as repository paths;
    package __init__ files that only hold a docstring run no code and are left out."""
    modules = closure(entry_imports(func))
    return {str(module_file(m).relative_to(ROOT)) for m in modules if not is_docstring_only(m)}


def covered_by(deps: list[str]) -> tuple[set[str], list[str]]:
    """(files the deps name, folder deps) with a folder dep standing for every .py file under it."""
    files, folders = set(), []
    for dep in deps:
        path = ROOT / dep
        if path.is_dir():
            folders.append(dep)
            files |= {str(p.relative_to(ROOT)) for p in path.rglob("*.py")}
        else:
            files.add(dep)
    return files, folders


@pytest.mark.parametrize("stage_name", sorted(stage_commands()))
def test_dvc_code_deps_are_exact(stage_name):
    from flows.cli import build_parser

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage_name]
    argv = stage["cmd"].split()
    assert argv[0] == "abair", stage["cmd"]
    func = build_parser().parse_args(argv[1:]).func
    expected = expected_files(func)
    listed, folders = covered_by(code_deps(stage))
    # a folder dep is only exact when the stage imports everything in it
    for folder in folders:
        partial = {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")} - expected
        partial = {p for p in partial if not (p.endswith("__init__.py") and is_docstring_only(module_name(ROOT / p)))}
        assert not partial, f"{stage_name}: folder dep {folder}/ covers modules the stage never imports: {sorted(partial)}"
    assert not expected - listed, f"{stage_name}: imported but missing from deps: {sorted(expected - listed)}"
    extra = {p for p in listed - expected if not (p.endswith("__init__.py") and is_docstring_only(module_name(ROOT / p)))}
    assert not extra, f"{stage_name}: listed in deps but never imported: {sorted(extra)}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour, stack = {}, []

    def visit(node) -> list[str] | None:
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = "black"
        return None

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_hidden_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = {name: module_imports(name, dynamic=False) - {name} for name in all_modules()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def room_of(name: str) -> int:
    matches = [i for i, room in enumerate(ROOMS) if name == room or name.startswith(room + ".")]
    return max(matches) if matches else -1


def test_no_room_imports_a_higher_one():
    wrong = [f"{name} -> {target}" for name in all_modules() for target in module_imports(name, dynamic=False)
             if room_of(name) >= 0 and room_of(target) > room_of(name)]
    assert not wrong, "lower room imports a higher one:\n" + "\n".join(wrong)


def test_every_module_imports_alone():
    """Each project module imported first, in a process where no other project module was
    imported (third-party libraries are preloaded once, then each import runs in a fork)."""
    script = textwrap.dedent(f"""
        import os, sys, traceback
        sys.path.insert(0, {str(ROOT)!r})
        import numpy, torch, cv2, yaml, mlflow, prefect  # heavy third-party imports, shared by the forks
        failed = []
        for name in {all_modules()!r}:
            pid = os.fork()
            if pid == 0:
                try:
                    __import__(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status:
                failed.append(name)
        print("FAILED", failed)
        sys.exit(1 if failed else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_importing_tasks_has_no_side_effects():
    script = ("import os, sys; before = dict(os.environ); import tasks, tasks.core, tasks.data, tasks.train, "
              "tasks.evaluate, tasks.registry, tasks.serve; "
              "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items()); "
              "assert not any(m.startswith(('torch', 'prefect', 'mlflow')) for m in sys.modules), 'heavy import'")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
