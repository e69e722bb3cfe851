"""The host heap of a process that runs an engine: glibc's malloc set up so that a step's large
temporaries are reused, not mapped and page-faulted afresh every time.

On the CPU a prefill step's activations are tens to hundreds of MB (4096 tokens x 6144 floats of a
fused gate/up projection is 100 MB). By default glibc serves a block above its mmap threshold (128 KB,
rising to at most 32 MB) with a fresh mmap, which is zeroed and faulted in page by page on first
touch and unmapped on free. An engine thread's own arena (a replica runs its engine on a thread) grows
in heaps of at most 64 MB, so there every large block is mapped afresh whatever the threshold. The
prefill workload of scripts/bench_engine.py (16 prompts of 512 tokens, the mid-size model) on a thread
took 450 thousand minor page faults per run with glibc's defaults and 28 with HEAP_ENV, ran 6.5% faster,
and peaked at 1.92 GB of RSS against 2.05 GB (docs/benchmarks.md, "The host heap").

HEAP_ENV is read by glibc when a process starts, so it goes into the environment of the processes that
will run engines (a CPU engine replica's runtime_env, or a script that re-executes itself with
`use_heap_env_here`): one arena for every thread, blocks below 1 GiB from the heap, and up to 1 GiB
of free memory kept at the heap's top. What a busy engine keeps, `trim` gives back (malloc_trim); the
engine thread calls it once the engine has been idle for a while. glibc 2.36 reuses a freed block for
an aligned request of its size (torch aligns to 64 bytes) only once several lie free, so a run of one
huge size can keep several; the idle trim gives their pages back. vLLM's CPU backend preloads tcmalloc
for the same reason. Other C libraries ignore the variables, and `trim` does nothing there."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

HEAP_ENV = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main arena, which has no 64 MB heap limit
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),  # blocks below 1 GiB come from the heap, and are reused
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),  # free() gives the heap's top back only above 1 GiB
}


def started_with_heap_env() -> bool:
    """Whether this process started with HEAP_ENV in its environment (what glibc read at start; a later
    change to os.environ does not count)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            initial = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:  # no /proc: judge by os.environ
        return all(os.environ.get(k) == v for k, v in HEAP_ENV.items())
    return all(initial.get(k.encode()) == v.encode() for k, v in HEAP_ENV.items())


def use_heap_env_here() -> None:
    """Re-execute this Python program with HEAP_ENV, unless it started with it; then take the variables
    out of os.environ, so that they apply to this process alone and not to what it starts (Ray's
    processes, a vLLM baseline). For a script that runs engines in its own process: call it first thing
    under `if __name__ == "__main__"`, never from a function a test may call (it replaces the process)."""
    if sys.platform != "linux":
        return
    if not started_with_heap_env():
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], os.environ | HEAP_ENV)
    for key in HEAP_ENV:
        os.environ.pop(key, None)


@functools.cache
def _malloc_trim():
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Give the heap's free memory back to the system (glibc's malloc_trim(0)); False where there is no
    such call. Costs milliseconds for a heap of hundreds of MB, so call it when idle, not per step."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
