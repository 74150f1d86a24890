"""``digits_cnn``: 10-class softmax CNN on 8x8x1 digit images (image featurizer label ``digit``),
blended at inference with an exemplar memory of the newest training images.

Pixels go through the guarded standardization (:mod:`trainer.specs.guard`): border pixels that were
always blank in training are ignored, so a speck there cannot swing the answer. Gate baseline:
the class prior (majority class) of the training rows.

The CNN's class probabilities are averaged with a shift-tolerant RBF-kernel vote of the newest
``MEMORY_ROWS`` training images (:mod:`trainer.specs.exemplars`): a version trained on a few
hundred images (the first versions of a stream) is far better as a kernel vote than as a CNN,
which memorises them. The CNN trains exactly as before (the head passes it through in training).
"""

from __future__ import annotations

from typing import Any

from trainer.spec import FeatureInfo, ModelSpec
from trainer.specs import common, exemplars, guard

CLASS_NAMES = [str(d) for d in range(10)]
#: exemplars kept (the newest training rows): every row of the 1,797 digits; 2048 x 64 floats = 512 KiB.
MEMORY_ROWS = 2048
#: RBF width on squared distances of pixels in 0..1 (64 of them); offline 2 scored best of 2, 5, 10, 20.
KERNEL_GAMMA = 2.0
#: weight of the vote in the blend: the CNN's softmax is overconfident (it memorises its rows), so an
#: even average let it outvote the kernel; 0.7 matched the vote alone at 200 and 800 rows, offline.
KERNEL_BLEND = 0.7


def build(features: FeatureInfo, seed: int) -> Any:
    import keras

    def init(k: int) -> Any:
        return keras.initializers.GlorotUniform(seed=seed + k)

    x, h = guard.guarded_inputs(features)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", kernel_initializer=init(0), name="conv1")(h)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", kernel_initializer=init(1), name="conv2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(64, activation="relu", kernel_initializer=init(2), name="dense")(h)
    cnn = keras.layers.Dense(10, activation="softmax", kernel_initializer=init(3), name="outputs")(h)
    out = exemplars.exemplar_blend(x, cnn, capacity=MEMORY_ROWS, n_classes=10, gamma=KERNEL_GAMMA,
                                   image_shape=features.input_shape[:2], blend=KERNEL_BLEND)
    return keras.Model(x, out, name="digits_cnn")


def _loss() -> Any:
    import keras

    return keras.losses.CategoricalCrossentropy()


SPEC = ModelSpec(
    name="digits_cnn",
    featurizer_kind="image",
    featurizer_version="image-v2",
    label="digit",
    task="classification",
    build=build,
    loss=_loss,
    metrics=lambda: common.classifier_metrics(10, positive_class=None),
    make_targets=common.one_hot_targets("digit", 10),
    adapt=guard.guard_adapter(),
    after_fit=exemplars.remember,
    score=common.accuracy,
    primary_metric="accuracy",
    direction="max",
    output_names=[f"p_{c}" for c in CLASS_NAMES],
    class_names=CLASS_NAMES,
    epochs=8,
    min_train_steps=300,
    batch_size=32,
    learning_rate=3e-3,
    description="handwritten digit class of an 8x8 grayscale image (CNN + exemplar kernel vote)",
)
