"""Import TensorFlow for serving without Keras: a restarted serving worker answers sooner.

Why: ``import tensorflow`` also imports all of Keras 3 when it is installed (for ``tf.keras`` and
"registration of optimizers in the SavedModel registry"), and Keras pulls in scikit-learn for its
wrappers. On the 2-core development box that is a quarter to a half of TensorFlow's 10-20 s import
(docs/RECOVERY.md has the figures), and a restarted ``streamlearn serve`` cannot answer before it.
Serving never needs Keras: a version is a SavedModel whose ``serving_default`` signature is a
concrete TensorFlow function (trainer.model_io), loaded with ``tf.saved_model.load``.

How: for the duration of the import, ``keras`` in ``sys.modules`` is a bare package object with
Keras' real spec and path (TensorFlow only reads its location), and ``keras.src`` / ``keras._tf_keras``
are marked unavailable, which TensorFlow's ``__init__`` tolerates (it catches the ImportError). The
markers are removed afterwards, so a later ``import keras`` (or ``tf.keras``) loads the real Keras.
When TensorFlow or Keras is already imported, or Keras is not installed, this is a plain import.
The version's warm-up (serving.model.load_version) still runs the real signature and checks its
outputs before the version answers anybody.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import types
from typing import Any

from serving.heap import freeze_startup_heap, paused_gc

_LOCK = threading.Lock()
_HIDDEN = ("keras.src", "keras._tf_keras")


def import_tensorflow() -> Any:
    """The ``tensorflow`` module, imported without Keras when this process has not imported either.

    An import made here runs with the cyclic collector paused and freezes the heap it leaves behind
    (serving.heap: ~0.5 s less CPU to import, no full-heap walk on a hot swap later).
    """
    with _LOCK:
        if "tensorflow" in sys.modules:
            import tensorflow as tf

            return tf
        with paused_gc():
            tf = _import_without_keras()
        freeze_startup_heap()
        return tf


def _import_without_keras() -> Any:
    """The import itself (caller holds _LOCK): Keras hidden unless it is imported already."""
    if "tensorflow" in sys.modules or any(n == "keras" or n.startswith("keras.") for n in sys.modules):
        import tensorflow as tf

        return tf
    try:
        spec = importlib.util.find_spec("keras")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        import tensorflow as tf

        return tf
    stub = types.ModuleType("keras")
    stub.__spec__ = spec
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__file__ = spec.origin
    sys.modules["keras"] = stub
    for name in _HIDDEN:
        sys.modules[name] = None  # type: ignore[assignment]  # "import halted": an ImportError
    try:
        import tensorflow as tf
    finally:
        if sys.modules.get("keras") is stub:
            del sys.modules["keras"]
        for name in _HIDDEN:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return tf


def start_background_import() -> threading.Thread:
    """Begin :func:`import_tensorflow` now, in a daemon thread, and return the thread.

    Why: ``streamlearn serve`` calls this first thing, so TensorFlow's import overlaps the CLI's and the
    worker's own imports and its Kafka setup instead of starting after them. A failure here is not
    lost: the model thread's own call imports again and raises it.
    """
    def run() -> None:
        try:
            import_tensorflow()
        except Exception as exc:  # the model thread's own import raises it again, with its context
            logging.getLogger(__name__).debug("background TensorFlow import failed: %s", exc)

    thread = threading.Thread(target=run, name="tf-import", daemon=True)
    thread.start()
    return thread
