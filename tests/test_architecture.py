"""The direction of imports (engines <- studio <- app.py) and a fast, light command line."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_ENGINES = ("gradio", "sqlite_utils", "studio", "app")
HEAVY = ("torch", "gradio", "diffusers", "transformers")


def run_python(code: str, timeout: float = 600) -> dict:
    """Run `code` in a fresh interpreter from the repository root; it prints one JSON object."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def imported_modules(node: ast.AST) -> set[str]:
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            names.update(alias.name for alias in sub.names)
        elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
            names.add(sub.module)
    return names


@pytest.mark.slow
def test_engines_import_without_ui_store_or_studio():
    code = """
import importlib, json, pkgutil, sys
import engines
names = ["engines"] + [m.name for m in pkgutil.walk_packages(engines.__path__, "engines.")]
for name in names:
    importlib.import_module(name)
top = sorted({k.split(".")[0] for k in sys.modules})
print(json.dumps({"modules": names, "top": top}))
"""
    result = run_python(code)
    assert {"engines.images", "engines.models", "engines.generation.generate"} <= set(result["modules"])
    loaded = set(result["top"])
    assert not loaded & set(FORBIDDEN_IN_ENGINES), sorted(loaded & set(FORBIDDEN_IN_ENGINES))


def test_engine_sources_never_import_ui_store_studio_or_read_argv_env():
    """Also catches imports hidden inside functions, which the sys.modules check cannot see."""
    files = sorted((ROOT / "engines").rglob("*.py"))
    assert files
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        bad = {m for m in imported_modules(tree) if m.split(".")[0] in FORBIDDEN_IN_ENGINES}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        for sub in ast.walk(tree):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                pair = (sub.value.id, sub.attr)
                assert pair not in {("sys", "argv"), ("os", "environ"), ("os", "getenv")}, \
                    f"{path.relative_to(ROOT)}:{sub.lineno} reads {'.'.join(pair)}"


PRODUCT = ("engines", "studio")
MAX_LINES = 600
ONE_FILE_REASON = "One file because"
"""A product file past MAX_LINES must say, in its module docstring, one sentence starting with this."""


def product_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every product module by dotted name: app, engines.*, studio.* (packages by their __init__.py)."""
    modules = {"app": root / "app.py"} if (root / "app.py").is_file() else {}
    for top in PRODUCT:
        for path in sorted((root / top).rglob("*.py")):
            modules[".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = path
    return modules


def _absolute(module: str | None, importer: str, level: int, is_package: bool) -> str:
    if level == 0:
        return module or ""
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> the product modules it imports anywhere in its source, also inside functions and under
    TYPE_CHECKING; [(importer, module, private name)] for every `_name` taken from another product module,
    by `from m import _name` or by `m._name` on an imported module)."""
    modules = product_modules(root)
    graph: dict[str, set[str]] = {}
    private: list[tuple[str, str, str]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        targets.add(alias.name)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node.module, name, node.level, is_package)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:  # `from package import module`
                        targets.add(full)
                        aliases[alias.asname or alias.name] = full
                    elif base in modules:
                        targets.add(base)
                        if alias.name.startswith("_") and base != name:
                            private.append((name, base, alias.name))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != name):
                private.append((name, aliases[node.value.id], node.attr))
        graph[name] = targets - {name}
    return graph, private


def engine_import_graph() -> dict[str, set[str]]:
    """engines.<module> -> the engines modules it imports anywhere in its source (also inside functions)."""
    graph, _ = import_graph()
    return {k: {m for m in v if m.startswith("engines")} for k, v in graph.items() if k.startswith("engines")}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk, each as [a, b, ..., a] (empty when imports point one way)."""
    cycles, state = [], {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return cycles


def architecture_problems(root: Path = ROOT) -> list[str]:
    """One line per broken rule of the house (see the README's Layout section)."""
    graph, private = import_graph(root)
    problems = [f"import cycle: {' -> '.join(c)}" for c in import_cycles(graph)]
    problems += [f"{a} imports the private name {name} of {b}" for a, b, name in private]
    for module, targets in graph.items():
        if module.startswith("engines"):
            problems += [f"{module} (an engine) imports {t}" for t in targets if not t.startswith("engines")]
        elif module.startswith("studio"):
            problems += [f"{module} imports the composition root" for t in targets if t == "app"]
    for module, path in product_modules(root).items():
        text = path.read_text()
        tree = ast.parse(text)
        doc = ast.get_docstring(tree) or ""
        if text.count("\n") > MAX_LINES and ONE_FILE_REASON not in doc:
            problems.append(f"{module} has {text.count(chr(10))} lines (> {MAX_LINES}) and no '{ONE_FILE_REASON} ...' "
                            "sentence in its docstring")
        if path.name == "__init__.py" and not doc.strip():
            problems.append(f"package {module} has no docstring saying what it owns and may import")
        for node in ast.walk(tree):  # engines never import UI, store or studio, even inside functions
            if module.startswith("engines") and isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = [n for n in names if n.split(".")[0] in ("gradio", "sqlite_utils", "studio", "app")]
                problems += [f"{module} (an engine) imports {n}" for n in bad]
    return sorted(set(problems))


def test_import_cycle_finder_finds_a_planted_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_engine_imports_point_one_way():
    """No two engines import each other, directly or around a circle (function-level imports count)."""
    graph = engine_import_graph()
    assert {"engines.models", "engines.detection.detect", "engines.generation.generate",
            "engines.segmentation.segment"} <= set(graph)
    assert import_cycles(graph) == []


def test_the_house_follows_its_rules():
    """No import cycle, no cross-module private import, engines <- studio <- app, files within 600 lines
    (or a sentence why not), and every package says what it owns."""
    assert architecture_problems() == []


def test_architecture_check_catches_planted_faults(tmp_path):
    """Each rule fails on a planted fault: a cycle, a private import (both forms), an engine importing
    studio and gradio, a long file without its reason, a package without a docstring."""
    (tmp_path / "engines" / "detection").mkdir(parents=True)
    (tmp_path / "studio" / "web").mkdir(parents=True)
    files = {
        "app.py": "import studio.web.ui\n",
        "engines/__init__.py": '"""Engines."""\n',
        "engines/detection/__init__.py": "",
        "engines/detection/a.py": '"""A."""\nfrom engines.detection import b\n\ndef _helper():\n    pass\n',
        "engines/detection/b.py": '"""B."""\n\ndef f():\n    from engines.detection.a import _helper\n    import gradio\n',
        "engines/long.py": '"""Long."""\n' + "x = 1\n" * 650,
        "studio/__init__.py": '"""Studio."""\n',
        "studio/web/__init__.py": '"""Web."""\n',
        "studio/web/ui.py": '"""UI."""\nfrom studio.web import tabs\nfrom engines.detection import a\nprint(a._helper, tabs._x)\n',
        "studio/web/tabs.py": '"""Tabs."""\nimport app\n_x = 1\n',
        "studio/web/fine.py": '"""Fine: long, with its reason. One file because it is a test."""\n' + "y = 1\n" * 650,
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    problems = "\n".join(architecture_problems(tmp_path))
    assert "import cycle: engines.detection.a -> engines.detection.b -> engines.detection.a" in problems
    assert "engines.detection.b imports the private name _helper of engines.detection.a" in problems
    assert "studio.web.ui imports the private name _helper of engines.detection.a" in problems
    assert "studio.web.ui imports the private name _x of studio.web.tabs" in problems
    assert "engines.detection.b (an engine) imports gradio" in problems
    assert "engines.long has 651 lines" in problems and "studio.web.fine" not in problems
    assert "package engines.detection has no docstring" in problems
    assert "studio.web.tabs imports the composition root" in problems
    assert "import cycle: app -> studio.web.ui -> studio.web.tabs -> app" in problems


def test_studio_never_imports_the_composition_root():
    for path in sorted((ROOT / "studio").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        assert "app" not in {m.split(".")[0] for m in imported_modules(tree)}, path.relative_to(ROOT)


def test_cli_import_is_light():
    code = """
import json, sys
import app, studio.cli.main
print(json.dumps(sorted({k.split(".")[0] for k in sys.modules})))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


@pytest.mark.parametrize("argv,words", [
    ([], ["serve", "generate", "import", "sessions"]),
    (["serve"], ["--host", "--auth", "--share", "--model"]),
    (["generate"], ["--session", "--prompt", "--seed", "--steps", "--count", "--create-session"]),
    (["import"], ["--session", "--skip-bad", "PATH"]),
    (["sessions"], ["--json", "--data-dir"]),
])
def test_help_of_app_and_each_subcommand(argv, words):
    proc = subprocess.run([sys.executable, "app.py", *argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: artifact-studio")
    for word in words:
        assert word in proc.stdout, word
    assert proc.stderr == ""


def subcommands() -> list[str]:
    import argparse

    from studio.cli.main import build_parser

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


@pytest.mark.slow
def test_every_subcommand_has_a_working_help():
    names = subcommands()
    assert {"serve", "generate", "import", "sessions"} <= set(names)
    for name in names:
        proc = subprocess.run([sys.executable, "app.py", name, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (name, proc.stderr)
        assert proc.stdout.startswith(f"usage: artifact-studio {name}"), name
