"""TensorBoard event files written with TensorFlow core only.

Why not ``keras.callbacks.TensorBoard`` / ``tf.summary.scalar``: both live in the ``tensorboard``
package, which ``tensorflow-cpu`` does not pull in and the pinned environment does not install.
``tf.summary.write`` with the ``scalars`` plugin metadata produces the very same event records, so
``tensorboard --logdir <model_dir>/<name>/tensorboard`` shows one run per version (``v<version>``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _scalar_metadata() -> Any:
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def write_scalars(log_dir: Path, step: int, values: dict[str, float | None]) -> None:
    """Append scalar summaries ``{tag: value}`` at ``step`` to an event file under ``log_dir``."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(log_dir))
    meta = _scalar_metadata()
    with writer.as_default():
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                tf.summary.write(tag, tf.constant(float(value), dtype=tf.float32), step=step, metadata=meta)
    writer.flush()
    writer.close()


def epoch_logger(log_dir: Path) -> Any:
    """A Keras callback writing every epoch's logs (loss and compiled metrics) as ``epoch_<name>``."""
    import keras
    import tensorflow as tf

    class EpochScalars(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.writer: Any = None

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.writer = tf.summary.create_file_writer(str(log_dir / "train"))

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            meta = _scalar_metadata()
            with self.writer.as_default():
                for name, value in (logs or {}).items():
                    v = float(value)
                    if math.isfinite(v):
                        tf.summary.write(f"epoch_{name}", tf.constant(v, tf.float32), step=epoch, metadata=meta)
            self.writer.flush()

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            if self.writer is not None:
                self.writer.close()

    return EpochScalars()
