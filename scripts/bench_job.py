"""`oneiros bench` as a Ray job against a running Oneiros cluster.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \
        python scripts/bench_job.py --rate 4 --duration 60 --json /tmp/bench.json

The job's driver runs on the head node, where Serve's HTTP proxy listens, so `--base-url` defaults to
http://127.0.0.1:8000/v1 (the port of the config's `http` section); pass it to point elsewhere. Every
other argument is `oneiros bench`'s (see `oneiros bench --help`); the table goes to the job's log
(`ray job logs JOB_ID`). With token auth on (as `oneiros serve` starts it), export the same
RAY_AUTH_MODE and token as the cluster before `ray job submit`.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from replicas.cli import main as oneiros

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def bench_argv(argv: list[str]) -> list[str]:
    """`oneiros bench` arguments: ours, with the head node's proxy as the default endpoint."""
    given = any(a == "--base-url" or a.startswith("--base-url=") for a in argv)
    return ["bench", *argv] if given else ["bench", "--base-url", DEFAULT_BASE_URL, *argv]


if __name__ == "__main__":
    sys.exit(oneiros(bench_argv(sys.argv[1:])))
