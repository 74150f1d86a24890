"""The exemplar memory head of digits_cnn (trainer/specs/exemplars.py): votes, shifts, bounds, blend.

A tiny model (a constant softmax "network" on 4x4 images), no training: cheap, and each property is
one the head must have whatever network it is blended with.
"""

from __future__ import annotations

import numpy as np

from trainer.specs import exemplars


def _model(blend: float = 1.0, capacity: int = 8):  # type: ignore[no-untyped-def]
    import keras

    x = keras.Input(shape=(16,), name="x")
    net = keras.layers.Dense(3, activation="softmax", kernel_initializer="zeros", name="net")(x)
    out = exemplars.exemplar_blend(x, net, capacity=capacity, n_classes=3, gamma=2.0, image_shape=(4, 4),
                                   blend=blend)
    return keras.Model(x, out)


def _images() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((4, 4), np.float32)
    a[1, :] = 1.0  # a horizontal bar
    b = np.zeros((4, 4), np.float32)
    b[:, 1] = 1.0  # a vertical bar
    c = np.zeros((4, 4), np.float32)
    c[1, 1] = c[2, 2] = 1.0  # a diagonal pair
    x = np.stack([a, b, c]).reshape(3, 16)
    return x, np.eye(3, dtype=np.float32)


def test_empty_memory_answers_uniform_and_training_mode_passes_the_network_through() -> None:
    model = _model(blend=1.0)
    x, _ = _images()
    assert np.allclose(np.asarray(model(x, training=False)), 1.0 / 3.0, atol=1e-6)
    model.get_layer(exemplars.LAYER_NAME)  # the name remember() looks for
    exemplars.remember(model, x, np.eye(3, dtype=np.float32))
    assert np.allclose(np.asarray(model(x, training=True)), 1.0 / 3.0, atol=1e-6)  # the zero-weight network


def test_votes_for_the_nearest_exemplar_also_one_pixel_shifted() -> None:
    model = _model(blend=1.0)
    x, y = _images()
    # a grey row makes every pixel vary in training, so none is pinned by the bounds (see the last test)
    exemplars.remember(model, np.concatenate([x, np.full((1, 16), 0.5, np.float32)]),
                       np.concatenate([y, y[2:]]))
    out = np.asarray(model(x, training=False))
    assert np.array_equal(np.argmax(out, axis=1), [0, 1, 2])
    moved = np.roll(x.reshape(3, 4, 4), 1, axis=1).reshape(3, 16)  # every image one row down
    assert np.array_equal(np.argmax(np.asarray(model(moved, training=False)), axis=1), [0, 1, 2])


def test_blend_weights_the_vote_and_the_network() -> None:
    model = _model(blend=0.5)
    x, y = _images()
    exemplars.remember(model, x, y)
    vote = np.asarray(model.get_layer(exemplars.LAYER_NAME).vote(x))
    assert np.allclose(np.asarray(model(x, training=False)), 0.5 * vote + 0.5 / 3.0, atol=1e-6)


def test_keeps_the_newest_rows_and_a_feature_constant_in_training_moves_nothing() -> None:
    model = _model(blend=1.0, capacity=2)
    x, y = _images()
    exemplars.remember(model, x, y)  # 3 rows, room for 2: the newest (b, c) are kept
    layer = model.get_layer(exemplars.LAYER_NAME)
    keys, _, used, lo, hi = layer.get_weights()
    assert np.array_equal(keys, x[1:]) and np.array_equal(used, [1.0, 1.0])
    assert lo[15] == hi[15] == 0.0  # the corner pixel was blank in every kept row
    probe = np.repeat(x[1:2], 3, axis=0)
    probe[:, 15] = [0.0, 1e6, -1e30]
    out = np.asarray(model(probe, training=False))
    assert np.all(np.isfinite(out)) and np.max(np.abs(out - out[0])) <= 1e-6
