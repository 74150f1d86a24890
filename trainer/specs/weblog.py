"""``weblog_classifier``: is a request from a bot or an attack? Small MLP, 2-class softmax.

Why softmax over two classes instead of one sigmoid: every classifier then has
``outputs[:, i] = P(class_names[i])``, so serving and the gate treat all classifiers alike.
Primary metric: balanced accuracy (attacks are rare; see ``common.balanced_accuracy``).
"""

from __future__ import annotations

from typing import Any

from trainer.spec import FeatureInfo, ModelSpec
from trainer.specs import common

CLASS_NAMES = ["normal", "bot_or_attack"]


def build(features: FeatureInfo, seed: int) -> Any:
    import keras

    def init(k: int) -> Any:
        return keras.initializers.GlorotUniform(seed=seed + k)

    x, h = common.inputs(features)
    h = keras.layers.Dense(32, activation="relu", kernel_initializer=init(0), name="hidden1")(h)
    h = keras.layers.Dense(16, activation="relu", kernel_initializer=init(1), name="hidden2")(h)
    out = keras.layers.Dense(2, activation="softmax", kernel_initializer=init(2), name="outputs")(h)
    return keras.Model(x, out, name="weblog_classifier")


def _loss() -> Any:
    import keras

    return keras.losses.CategoricalCrossentropy()


SPEC = ModelSpec(
    name="weblog_classifier",
    featurizer_kind="weblog",
    featurizer_version="weblog-v1",
    label="is_bot_or_attack",
    task="classification",
    build=build,
    loss=_loss,
    metrics=lambda: common.classifier_metrics(2, positive_class=1),
    make_targets=common.one_hot_targets("is_bot_or_attack", 2),
    score=common.balanced_accuracy,
    primary_metric="balanced_accuracy",
    direction="max",
    output_names=["p_normal", "p_bot_or_attack"],
    class_names=CLASS_NAMES,
    epochs=3,
    batch_size=64,
    learning_rate=3e-3,
    description="bot/attack vs normal web requests (weblog featurizer label is_bot_or_attack)",
)
