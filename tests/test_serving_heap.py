"""serving.heap: the collector is paused only around TensorFlow's import, and the startup heap is frozen once.

Runs in a fresh interpreter (no TensorFlow): a freeze in the test process would keep that process's
garbage alive for the rest of the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import gc, weakref
from serving import heap

assert gc.isenabled()
with heap.paused_gc():
    assert not gc.isenabled()
    with heap.paused_gc():  # nested: still paused after the inner block ends
        pass
    assert not gc.isenabled()
assert gc.isenabled(), "the collector must be back on when the last pause ends"

gc.disable()  # a process that turned the collector off keeps it off
with heap.paused_gc():
    pass
assert not gc.isenabled()
gc.enable()

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.b, b.a = b, a
    return weakref.ref(a)

old = cycle()  # garbage made before the freeze is frozen with the heap (why the freeze happens at startup)
assert heap.freeze_startup_heap() is True
assert gc.get_freeze_count() > 0
assert heap.freeze_startup_heap() is False, "the heap is frozen once per process"
new = cycle()  # a model version loaded after the freeze stays collectable
gc.collect()
assert new() is None, "a cycle made after the freeze was not collected"
assert old() is not None, "the freeze did not take the startup heap out of the collection"
print("ok")
"""


def test_heap_pause_nests_and_the_freeze_is_once_and_keeps_new_objects_collectable() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
