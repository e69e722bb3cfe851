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

# On an engine-like thread: the bytes glibc has mapped for blocks of their own (mallinfo2's hblkhd) while
# a 100 MB tensor lives. By default a block that large is its own mapping, zeroed and faulted in afresh
# each time; with HEAP_ENV it comes from the heap, which keeps it when it is freed. (How soon the heap
# reuses a freed block of one size varies: glibc 2.36 fits an aligned request, and torch aligns to 64
# bytes, into a freed block of its size only once several lie free, so faults are not counted here.)
MAPPED = """
import ctypes, threading, torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info
out = []
def work():
    t = torch.empty(25 * 1024 * 1024)
    t.fill_(1.0)
    out.append(mallinfo2().hblkhd)
thread = threading.Thread(target=work)
thread.start(); thread.join()
print(out[0] >> 20)
"""


def _python(code: str, env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in heap.HEAP_ENV}
    done = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@glibc
def test_with_the_heap_env_a_threads_large_blocks_come_from_the_heap_not_fresh_mappings():
    assert int(_python(MAPPED, {})) >= 100  # MB mapped for the tensor alone
    assert int(_python(MAPPED, heap.HEAP_ENV)) < 100


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
