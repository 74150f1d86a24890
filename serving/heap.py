"""The serving process's garbage collector: off during TensorFlow's import, startup heap frozen after it.

Why (measured on the 2-core dev box, docs/SERVING_LATENCY.md):

* A hot swap used to stall the batch loop for 260-290 ms: loading a SavedModel allocates enough
  objects to trigger a full (generation 2) collection, and a full collection walks every tracked
  object of the process, ~400,000 of them after TensorFlow's import, holding the GIL, on whichever
  thread happens to allocate (the serving loop, usually). The old version's cycles it frees are a
  few thousand objects; the walk over TensorFlow's modules is the cost. ``gc.freeze()`` once, after
  the import, moves those long-lived objects to the permanent generation, which collections skip:
  a full collection then walks only what was made since (loaded versions, clients, batches).
* TensorFlow's import itself runs four full collections over a growing heap that frees nothing:
  about 0.55 s of its ~3.5 s CPU. A restarted worker cannot answer before the import ends, so the
  collector is paused for its duration.

Nothing is leaked by design: the freeze happens once per process, right after the import (or when
the first serving worker starts, if something else imported TensorFlow first), when the heap is
modules, functions and classes that live as long as the process; model versions, which come and go
with swaps, are made afterwards and stay collectable.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_paused = 0  # nesting depth of paused_gc() across threads
_was_enabled = False
_frozen = False


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Cyclic GC off for the block (reference counting still frees everything acyclic).

    Nested or concurrent uses share one pause; the collector is enabled again when the last one
    ends, and only if it was enabled when the first one began.
    """
    global _paused, _was_enabled
    with _LOCK:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _LOCK:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()


def freeze_startup_heap() -> bool:
    """``gc.freeze()`` the objects alive now, once per process; True when this call froze them."""
    global _frozen
    with _LOCK:
        if _frozen:
            return False
        _frozen = True
        gc.freeze()
    log.debug("froze %d startup objects out of the collector's walks", gc.get_freeze_count())
    return True
