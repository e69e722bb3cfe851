"""replicas/engine/heap.py: glibc's heap set up for an engine's large temporaries, in real processes."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import time

import pytest

from replicas.config import default_config
from replicas.engine import heap
from replicas.engine.sampling import SamplingParams
from replicas.service import server as server_mod
from replicas.service.server import EngineServer

glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

# On an engine-like thread: a 100 MB tensor allocated, written and freed twelve times; the minor page
# faults of the last three. By default each is a fresh mapping (~25,600 faults of 4 KiB pages). With
# HEAP_ENV they come from the heap, which glibc 2.36 reuses for blocks of one size only once a few lie
# free (torch asks for 64-byte alignment, and an aligned request does not fit the block it freed).
FAULTS = """
import resource, threading, torch
out = []
def work():
    for i in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(25 * 1024 * 1024)
        t.fill_(1.0)
        del t
        if i >= 9:
            out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start(); thread.join()
print(sum(out))
"""


def _python(code: str, env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in heap.HEAP_ENV}
    done = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@glibc
def test_with_the_heap_env_a_threads_large_blocks_are_reused_not_faulted_in_again():
    default = int(_python(FAULTS, {}))
    tuned = int(_python(FAULTS, heap.HEAP_ENV))
    assert default > 3 * 20_000  # three fresh 100 MB mappings
    assert tuned < 2_000, (default, tuned)


@glibc
def test_trim_gives_back_what_the_heap_kept():
    code = """
import torch
from replicas.engine import heap
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
t = torch.empty(50 * 1024 * 1024); t.fill_(1.0)   # 200 MB from the heap
del t
kept = rss_mb()
assert heap.trim()
print(kept - rss_mb())
"""
    assert float(_python(code, heap.HEAP_ENV)) > 150  # MB given back


@glibc
def test_a_script_reexecutes_itself_once_and_its_children_do_not_inherit_the_env():
    code = """
import os, subprocess, sys
from replicas.engine import heap
heap.use_heap_env_here()
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_ARENA_MAX'))"],
                       capture_output=True, text=True).stdout.strip()
print(heap.started_with_heap_env(), os.environ.get("MALLOC_ARENA_MAX"), child)
"""
    assert _python(code, {}) == "True None None"


def test_cpu_engine_replicas_start_with_the_heap_env_and_gpu_ones_without():
    from replicas.service.deployments import ENGINE_ENV, engine_env

    assert engine_env(0) == ENGINE_ENV | heap.HEAP_ENV
    assert engine_env(1) == ENGINE_ENV and not heap.HEAP_ENV.keys() & ENGINE_ENV.keys()


def test_an_idle_engine_thread_trims_the_heap_once_per_idle_period(monkeypatch):
    trims: list[float] = []
    monkeypatch.setattr(server_mod, "HEAP_TRIM_IDLE_S", 0.3)
    monkeypatch.setattr(heap, "trim", lambda: trims.append(time.monotonic()) or True)
    srv = EngineServer(default_config(), replica_id="r0", models=["llama"])
    try:
        time.sleep(1.0)  # idle from the start: one trim, not one per idle tick
        assert len(trims) == 1

        async def run():
            return [item async for item in srv.generate("llama", [5, 6, 7], SamplingParams(max_tokens=40,
                                                                                           ignore_eos=True))]

        start = time.monotonic()
        items = asyncio.run(run())
        done = time.monotonic()
        assert items[-1].finished
        time.sleep(1.0)
        assert not [t for t in trims if start <= t <= done]  # none while it works
        assert len(trims) == 2 and trims[1] > done  # once more, after the idle period
    finally:
        srv.close()
