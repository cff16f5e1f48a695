"""Compilation: JAX's persistent compilation cache, and counting what a run compiles.

A run counts XLA compilations with ``jax.monitoring`` listeners: every program JAX hands to
the backend fires ``/jax/core/compile/backend_compile_duration`` (with the program's name and
seconds), whether XLA compiles it or it comes from the persistent cache, and a program found in
the cache also fires ``/jax/compilation_cache/cache_hits``. Compiled = programs - cache hits.

The persistent cache (``jax_compilation_cache_dir``) keeps compiled programs on disk, keyed by
the program, the compile options, the XLA flags and the jax/jaxlib versions, so a rerun (or
another workdir with the same shapes, or another process of a study) loads instead of
compiling. JAX caches only programs that took at least
``jax_persistent_cache_min_compile_time_secs`` (default 1 s) to compile; here every program
is cached (0 s), so a rerun compiles nothing.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/fgnet_jax/jax_compilation_cache`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fgnet_jax", "jax_compilation_cache")


def enable_persistent_cache(directory: str) -> None:
    """Turn on JAX's persistent compilation cache in ``directory`` for every program.

    Call before the first compilation (the cache is initialised once per process)."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def configure(flag: str) -> str | None:
    """Apply a ``--compilation_cache`` value: ``"off"``; ``"default"`` (``$JAX_COMPILATION_CACHE_DIR``
    if set, else :func:`default_cache_dir`); or a directory. Returns the directory in use."""
    if flag == "off":
        return None
    directory = (os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()) if flag == "default" else flag
    enable_persistent_cache(directory)
    return directory


def _bare_name(name: str) -> str:
    """``jit(train_step)`` / ``pmap(train_step)`` -> ``train_step``."""
    while "(" in name and name.endswith(")") and name.split("(", 1)[0].isidentifier():
        name = name.split("(", 1)[1][:-1]
    return name


class _Counts:
    """Process-wide counts (jax.monitoring listeners are global; registered once)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.programs = 0
        self.seconds = 0.0
        self.cache_hits = 0
        self.by_name: Counter = Counter()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, seconds: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self.lock:
                self.programs += 1
                self.seconds += seconds
                self.by_name[_bare_name(kwargs.get("fun_name", "?"))] += 1

    def _on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            with self.lock:
                self.cache_hits += 1


_COUNTS: _Counts | None = None


def _counts() -> _Counts:
    global _COUNTS
    if _COUNTS is None:
        _COUNTS = _Counts()
    return _COUNTS


class CompileCounter:
    """Counts the compilations between its creation (or ``reset``) and now.

    >>> counter = CompileCounter()
    >>> ...                       # run something
    >>> counter.compiled, counter.cache_hits, counter.seconds
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        counts = _counts()
        with counts.lock:
            self._start = (counts.programs, counts.cache_hits, counts.seconds, Counter(counts.by_name))

    @property
    def programs(self) -> int:
        return _counts().programs - self._start[0]

    @property
    def cache_hits(self) -> int:
        return _counts().cache_hits - self._start[1]

    @property
    def compiled(self) -> int:
        return self.programs - self.cache_hits

    @property
    def seconds(self) -> float:
        """Seconds spent in the backend (compiling, or loading from the cache)."""
        return _counts().seconds - self._start[2]

    def by_name(self) -> dict[str, int]:
        """Programs per function name (a name seen twice compiled twice, or two shapes)."""
        return dict(_counts().by_name - self._start[3])

    def summary(self) -> dict:
        return {"programs": self.programs, "compiled": self.compiled, "cache_hits": self.cache_hits,
                "backend_seconds": round(self.seconds, 2), "by_name": self.by_name()}

    def line(self) -> str:
        return (f"compilations: {self.compiled} programs compiled, {self.cache_hits} loaded from the persistent "
                f"cache ({self.seconds:.1f} s in the compiler/cache)")
