"""``weblog_classifier``: will this request fail (status >= 400)? Small MLP, 2-class softmax.

Why this task (docs/MODELS.md "Web logs without labels"): a real combined/common access log
carries no bot/attack label, but every line states its status. ``weblog-v2``'s label
``is_failed`` (status >= 400) is therefore known for every request of any log, and predicting it
from the *request* (method, path and its hashed tokens, query, user agent class, client rate,
time of day) is useful: probes for ``/wp-login.php``, dead links and broken clients show up
before anyone reads the error log. The features that *are* the server's answer (status class,
response size, latency) are excluded from the model's inputs (the guard ignores them), otherwise
the task would be trivial and its score meaningless.

Evaluation: balanced accuracy (failures are ~2% of the real sample, so plain accuracy rewards
"always ok"); the gate's baseline is the class prior, whose balanced accuracy is 0.5. Rows are
weighted by inverse class frequency in training for the same reason.

``BOT_SPEC`` keeps the generator's bot/attack task for logs that do carry labels; enable it with a
``[models]`` line ``weblog_bot_classifier = "trainer.specs.weblog:BOT_SPEC"``.

Why softmax over two classes instead of one sigmoid: every classifier then has
``outputs[:, i] = P(class_names[i])``, so serving and the gate treat all classifiers alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streaming.features.weblog_v2 import OUTCOME_FEATURES
from trainer.spec import FeatureInfo, ModelSpec
from trainer.specs import common, guard

CLASS_NAMES = ["ok", "failed"]


def _outcome_indices() -> list[int]:
    from streaming.features import get_featurizer

    names = get_featurizer("weblog", "weblog-v2").feature_names
    return [names.index(n) for n in OUTCOME_FEATURES]


def build(features: FeatureInfo, seed: int) -> Any:
    import keras

    def init(k: int) -> Any:
        return keras.initializers.GlorotUniform(seed=seed + k)

    x, h = guard.guarded_inputs(features)
    h = keras.layers.Dense(32, activation="relu", kernel_initializer=init(0), name="hidden1")(h)
    h = keras.layers.Dense(16, activation="relu", kernel_initializer=init(1), name="hidden2")(h)
    out = keras.layers.Dense(2, activation="softmax", kernel_initializer=init(2), name="outputs")(h)
    return keras.Model(x, out, name="weblog_classifier")


def _loss() -> Any:
    import keras

    return keras.losses.CategoricalCrossentropy()


def _adapt(model: Any, x: Any) -> None:
    guard.guard_adapter(_outcome_indices())(model, x)


SPEC = ModelSpec(
    name="weblog_classifier",
    featurizer_kind="weblog",
    featurizer_version="weblog-v2",
    label="is_failed",
    task="classification",
    build=build,
    adapt=_adapt,
    loss=_loss,
    metrics=lambda: common.classifier_metrics(2, positive_class=1),
    make_targets=common.one_hot_targets("is_failed", 2),
    score=common.balanced_accuracy,
    primary_metric="balanced_accuracy",
    direction="max",
    output_names=["p_ok", "p_failed"],
    class_names=CLASS_NAMES,
    baseline="prior",
    balance_classes=True,
    epochs=3,
    min_train_steps=200,
    batch_size=64,
    learning_rate=3e-3,
    description="will the request fail (status >= 400)? from the request alone (weblog-v2 label is_failed)",
)

BOT_SPEC = dataclasses.replace(
    SPEC, name="weblog_bot_classifier", label="is_bot_or_attack", adapt=guard.guard_adapter(),
    make_targets=common.one_hot_targets("is_bot_or_attack", 2), output_names=["p_normal", "p_bot_or_attack"],
    class_names=["normal", "bot_or_attack"],
    description="bot/attack vs normal (needs producer-labelled events: weblog label is_bot_or_attack)",
)
