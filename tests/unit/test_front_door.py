"""The project's shape: pure packages stay pure, and CI runs exactly the README's test command."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHELL_LIBS = {"ray", "fastapi", "starlette", "uvicorn", "grpc", "aiohttp", "httpx"}
# package -> top-level packages (or dotted prefixes) it may import from this project
# (a folder, or one file); the Ray shells (replicas/service, cluster/actor.py, autoscaler/serve_policy.py) are
# the only places Ray and HTTP appear
ALLOWED_PROJECT_IMPORTS = {
    "remap": ("remap",),
    "replicas/engine": ("remap", "replicas.engine"),
    "replicas/sim": ("remap", "replicas.engine", "replicas.sim", "replicas.bench", "autoscaler.policy",
                     "cluster.messages", "cluster.state"),
    "cluster/messages.py": (),
    "cluster/state.py": ("cluster.messages",),
    "autoscaler/policy.py": (),
}
PROJECT_PACKAGES = ("remap", "replicas", "cluster", "autoscaler")


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED_PROJECT_IMPORTS))
def test_pure_packages_import_no_ray_http_or_anything_above_them(package):
    allowed = ALLOWED_PROJECT_IMPORTS[package]
    files = [ROOT / package] if package.endswith(".py") else sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = []
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top in SHELL_LIBS:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif top in PROJECT_PACKAGES and not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {name} (above {package})")
    assert not bad, "\n".join(bad)


def test_the_import_check_catches_a_ray_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom ray import serve\n")
    assert "ray" in _imports(bad)


# The engine's insides: its private attributes, and its scheduler (queues, preemption) that only the engine drives
ENGINE_INSIDES = re.compile(r"\bengine\._[a-z]|(?<!replicas\.)\bengine\.scheduler\b|\.scheduler\.(running|waiting|swapped|num_|_)"
                            r"|\bmemory\._[a-z]")


def test_nothing_outside_the_engine_reaches_into_its_insides():
    """White-box tests may (they force events); the product and its scripts use the engine's API."""
    bad = []
    for package in ("replicas", "cluster", "autoscaler", "scripts"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "replicas/engine"):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if ENGINE_INSIDES.search(line.split("#")[0]):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_the_backend_kind_is_read_once_to_choose_the_placement():
    """Home runs or any pages is decided in one place (DeviceMemory picks a Placement); no other code
    branches on what the backend can map."""
    reads = [str(path.relative_to(ROOT)) for package in PROJECT_PACKAGES + ("scripts",)
             for path in sorted((ROOT / package).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr == "needs_home_runs"]
    assert reads == ["remap/memory.py"], reads


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("python3 -m venv")]


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_cmd[0] in ci_lines


def test_readme_main_command_installs_without_test_extras():
    main_cmd = [c for c in _readme_commands() if "pytest" not in c]
    assert len(main_cmd) == 1 and "oneiros" in main_cmd[0]
