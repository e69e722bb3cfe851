"""The files an operator takes as they are: the Dockerfiles build the images the manifests name from
what is in this repository, and the Grafana dashboard queries only series the replicas export."""

from __future__ import annotations

import json
import pathlib
import re
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m[0].lstrip().startswith("#")]


def manifest_images() -> set[str]:
    return {c["image"] for p in (ROOT / "k8s").glob("*.yaml") for doc in yaml.safe_load_all(p.read_text()) if doc
            for c in _containers(doc)}


def _containers(node):
    if isinstance(node, dict):
        if "image" in node and "name" in node:
            yield node
        for value in node.values():
            yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


def test_there_is_a_dockerfile_for_every_image_the_manifests_name():
    named = {}
    for path in DOCKERFILES:
        labels = [a for i, a in instructions(path) if i == "LABEL" and "org.opencontainers.image.ref.name" in a]
        assert len(labels) == 1, f"{path.name} names no image (LABEL org.opencontainers.image.ref.name)"
        named[labels[0].split("=", 1)[1].strip('"')] = path.name
    assert set(named) == manifest_images(), (named, manifest_images())


def test_every_dockerfile_copies_what_exists_and_runs_a_real_entrypoint():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for path in DOCKERFILES:
        steps = instructions(path)
        assert steps[0][0] == "FROM" and "2.60.0" in steps[0][1], f"{path.name}: not on Ray 2.60"
        for instruction, args in steps:
            if instruction == "COPY":
                sources = [a for a in args.split() if not a.startswith("--")][:-1]
                for source in sources:
                    assert (ROOT / source).exists(), f"{path.name} copies {source}, which is not in the repository"
        cmd = json.loads(next(a for i, a in steps if i == "CMD"))
        assert cmd[0] in scripts, f"{path.name} runs {cmd[0]!r}, not one of the project's commands {sorted(scripts)}"
        pins = " ".join(a for i, a in steps if i == "RUN")
        assert "torch==2.13.0" in pins, f"{path.name} does not pin torch as pyproject.toml does"
        copied = {a.split()[-2].lstrip("./") for i, a in steps if i == "COPY"}
        packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
        assert {p.rstrip("*") for p in packages["include"]} <= copied, f"{path.name} leaves a package out"


def test_the_grafana_dashboard_plots_the_series_the_readme_lists_and_no_other():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"`(ray_oneiros_[a-z_]+)`", readme))
    assert listed, "the README lists no Prometheus series"
    board = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for panel in board["panels"] for t in panel["targets"])
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\bray_oneiros_[a-z_]+", exprs)}
    assert used == listed, (sorted(used - listed), sorted(listed - used))
    assert all(t["datasource"]["uid"] == "${datasource}" for panel in board["panels"] for t in panel["targets"])
