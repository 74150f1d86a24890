"""get_featurizer: the contract of docs/ARCHITECTURE.md for every kind, and version lookup."""

from __future__ import annotations

import pytest

from streaming.exceptions import StreamingError, UnknownKindError
from streaming.features import (
    FeatureRow,
    Featurizer,
    UnknownFeaturizerError,
    available_versions,
    current_version,
    get_featurizer,
)


@pytest.mark.parametrize(
    ("kind", "version", "n", "shape", "labels"),
    [
        ("weblog", "weblog-v2", 64, (64,), ["is_bot_or_attack", "is_error", "is_failed"]),
        ("sensor", "sensor-v3", 22, (22,), ["next_value_delta", "is_anomaly"]),
        ("image", "image-v2", 64, (8, 8, 1), ["digit"]),
    ],
)
def test_contract_attributes(kind: str, version: str, n: int, shape: tuple[int, ...], labels: list[str]) -> None:
    f = get_featurizer(kind)
    assert isinstance(f, Featurizer)
    assert (f.kind, f.version, f.n_features, f.input_shape, f.label_names) == (kind, version, n, shape, labels)
    assert len(f.feature_names) == n == len(set(f.feature_names))
    assert current_version(kind) == version and version in available_versions(kind)
    assert get_featurizer(kind, version).version == version
    assert get_featurizer(kind, version.split("-")[1]).version == version
    assert get_featurizer(kind, "v1").version == f"{kind}-v1"  # older versions stay registered
    assert f.describe()["version"] == version
    assert f.state_from_json(f.state_to_json(f.new_state())) == f.new_state()
    assert callable(f.featurize_for_prediction)
    assert FeatureRow.__slots__ == ("x", "labels", "event_time_ms", "key")


def test_unknown_kind_and_version() -> None:
    with pytest.raises(UnknownKindError, match="kind: unknown featurizer kind 'audio'"):
        get_featurizer("audio")
    with pytest.raises(UnknownFeaturizerError, match="weblog-v9.*weblog-v1.*weblog-v2") as info:
        get_featurizer("weblog", "v9")
    assert isinstance(info.value, StreamingError)
