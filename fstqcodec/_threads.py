"""Worker threads for ``encode(..., threads=N)`` and ``decode(..., threads=N)``.

The encoder's per-block passes, the rANS coder and zstd run in C without the GIL, so threads
share the work of one message: each pass is split into contiguous ranges of blocks (or run per
tensor, per context), every range writes its own part of the output, and nothing is summed
across ranges, so the bytes are the same for any number of threads. The number of threads
travels in a context variable set by ``encode``/``decode`` for their duration: worker threads do
not inherit it, so work is never split twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import threading

__all__ = ["check_threads", "using", "current", "map_ranges", "map_items"]

_THREADS: contextvars.ContextVar[int] = contextvars.ContextVar("fstqcodec_threads", default=1)
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
#: Ranges smaller than this many items are not split (a thread hand-off costs tens of µs).
_MIN_ITEMS_PER_THREAD = 4096


def check_threads(threads) -> int:
    """``threads`` as an int >= 1 (None means 1).

    Raises
    ------
    ValueError
        If it is not None or an int >= 1.
    """
    if threads is None:
        return 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    return threads


@contextlib.contextmanager
def using(threads: int):
    """Run the body with ``threads`` worker threads for the passes that split."""
    token = _THREADS.set(threads)
    try:
        yield
    finally:
        _THREADS.reset(token)


def current() -> int:
    return _THREADS.get()


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fstqcodec")
        return _POOLS[threads]


def map_items(function, items) -> list:
    """``[function(item) for item in items]``, on the worker threads when there are several (the
    results in order; the first failing item's exception is raised)."""
    items = list(items)
    threads = current()
    if threads == 1 or len(items) < 2:
        return [function(item) for item in items]
    futures = [_pool(threads).submit(function, item) for item in items]
    return [future.result() for future in futures]


def map_ranges(total: int, function) -> None:
    """``function(lo, hi)`` over contiguous ranges covering ``range(total)``, one per thread."""
    threads = min(current(), max(1, total // _MIN_ITEMS_PER_THREAD))
    if threads == 1:
        function(0, total)
        return
    bounds = [total * k // threads for k in range(threads + 1)]
    map_items(lambda k: function(bounds[k], bounds[k + 1]), range(threads))
