"""A two-node Ray cluster (ray.cluster_utils.Cluster) serves every model, on both nodes."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_two_nodes_each_run_a_replica_and_serve_requests():
    proc = subprocess.run([sys.executable, str(ROOT / "tests/ray/two_node_check.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(lines[-1]) == {"nodes": 2, "served_on_nodes": 2}
