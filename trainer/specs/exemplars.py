"""An exemplar memory head: a shift-tolerant RBF-kernel vote over the newest training images.

Why: the learning benchmark (docs/MODELS.md) serves batch *i* with a version trained on batches up
to *i-3* (the gate's 200-row holdout is trained on only by the next version), so the first digits
versions learn from 100-500 images. A CNN memorises that few rows and generalises poorly; a kernel
method does well on them (offline, same lagged schedule: soft nearest-neighbour vote with one-pixel
query shifts 0.941 accuracy, River's online logistic regression 0.933, the CNN alone 0.917).

:class:`ExemplarVote` (built by :func:`exemplar_blend`) keeps up to ``capacity`` training rows as
non-trainable weights (``keys`` in input units, one-hot ``values``, a ``used`` mask) plus per-feature
bounds ``lo``/``hi`` of the training rows. At inference a request is clipped to ``[lo, hi]`` (a
feature constant in training is pinned to that constant, so varying it at serving moves nothing;
+-1e30 stays finite), compared with every key at the request's one-pixel shifts (the smallest
squared distance counts), and the keys vote with ``softmax(-gamma * distance)``. The head's class
probabilities are averaged with the network's (``blend``). In training (``training=True``) the layer
passes the network's output through unchanged, so the network learns exactly as without the head.

The memory is filled after every fit by :func:`remember` (``ModelSpec.after_fit``): the newest
``capacity`` training rows (the trainer orders reservoir first, new batches last). It is part of
the weights, so the SavedModel, warm starts and ``retrain --reproduce`` carry it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

LAYER_NAME = "exemplars"
#: one-pixel query shifts (rows, columns); (0, 0) first.
SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


@functools.cache
def _layer_class() -> Any:
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="streamlearn")
    class ExemplarVote(keras.layers.Layer):
        """Inputs ``[x, network_probs]``; inference: ``(1 - blend) * network + blend * kernel vote``."""

        def __init__(self, capacity: int, n_features: int, n_classes: int, gamma: float,
                     image_shape: Sequence[int], blend: float = 0.5,
                     shifts: Sequence[Sequence[int]] = SHIFTS, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.capacity, self.n_features, self.n_classes = int(capacity), int(n_features), int(n_classes)
            self.gamma, self.blend = float(gamma), float(blend)
            self.image_shape = tuple(int(d) for d in image_shape)
            self.shifts = tuple((int(dy), int(dx)) for dy, dx in shifts)

            def weight(shape: tuple[int, ...], name: str) -> Any:
                return self.add_weight(shape=shape, initializer="zeros", trainable=False, name=name)

            # Empty until remember(): an unused memory answers the uniform distribution.
            self.keys = weight((self.capacity, self.n_features), "keys")
            self.values = weight((self.capacity, self.n_classes), "values")
            self.used = weight((self.capacity,), "used")
            self.lo = weight((self.n_features,), "lo")
            self.hi = weight((self.n_features,), "hi")

        def _shifted(self, q: Any) -> list[Any]:
            h, w = self.image_shape
            img = ops.pad(ops.reshape(q, (-1, h, w)), [[0, 0], [1, 1], [1, 1]])
            return [ops.reshape(img[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w], (-1, self.n_features))
                    for dy, dx in self.shifts]

        def vote(self, x: Any) -> Any:
            q = ops.clip(x, self.lo, self.hi)
            key_sq = ops.sum(ops.square(self.keys), axis=1)
            dists = [ops.sum(ops.square(s), axis=1, keepdims=True) - 2.0 * ops.matmul(s, ops.transpose(self.keys))
                     + key_sq[None, :] for s in self._shifted(q)]
            dist = dists[0]
            for d in dists[1:]:  # the closest shift of the request counts
                dist = ops.minimum(dist, d)
            logits = ops.where(self.used[None, :] > 0.0, -self.gamma * dist, -1e9)
            probs = ops.matmul(ops.softmax(logits, axis=-1), self.values)
            filled = ops.max(self.used)
            return probs * filled + (1.0 - filled) / float(self.n_classes)

        def call(self, inputs: Any, training: Any = None) -> Any:
            x, net = inputs
            if training:
                return net
            return (1.0 - self.blend) * net + self.blend * self.vote(x)

        def compute_output_shape(self, input_shape: Any) -> Any:
            return input_shape[1]

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "capacity": self.capacity, "n_features": self.n_features,
                    "n_classes": self.n_classes, "gamma": self.gamma, "image_shape": list(self.image_shape),
                    "blend": self.blend, "shifts": [list(s) for s in self.shifts]}

    return ExemplarVote


def exemplar_blend(x: Any, network_probs: Any, *, capacity: int, n_classes: int, gamma: float,
                   image_shape: Sequence[int], blend: float = 0.5) -> Any:
    """The network's class probabilities blended with an exemplar vote on the raw input ``x``."""
    n_features = int(np.prod(image_shape))
    layer = _layer_class()(capacity, n_features, n_classes, gamma, image_shape, blend, name=LAYER_NAME)
    return layer([x, network_probs])


def remember(model: Any, x: np.ndarray, y: np.ndarray) -> None:
    """``ModelSpec.after_fit``: keep the newest ``capacity`` rows of ``(x, one-hot y)`` and their bounds."""
    layer = model.get_layer(LAYER_NAME)
    cap, n_features, n_classes = layer.capacity, layer.n_features, layer.n_classes
    keys = np.zeros((cap, n_features), np.float32)
    values = np.zeros((cap, n_classes), np.float32)
    used = np.zeros(cap, np.float32)
    x = np.asarray(x, dtype=np.float32)[-cap:]
    y = np.asarray(y, dtype=np.float32)[-cap:]
    finite = np.all(np.isfinite(x), axis=1) & np.all(np.isfinite(y), axis=1)
    x, y = x[finite], y[finite]
    n = len(x)
    if n == 0:
        layer.set_weights([keys, values, used, np.zeros(n_features, np.float32), np.zeros(n_features, np.float32)])
        return
    keys[:n], values[:n], used[:n] = x, y, 1.0
    layer.set_weights([keys, values, used, x.min(axis=0), x.max(axis=0)])
