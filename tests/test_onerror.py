"""The error policy hook (streaming/onerror.py): one ``on_error(stage, exc, record)`` decides, in the
stream pipeline and in serving's request decode, whether a failing record is dead-lettered (the
default) or stops the worker; there is no silent skip."""

from __future__ import annotations

import doctest
from collections import namedtuple
from typing import Any

import pytest

import streaming.onerror
from schemas.exceptions import SchemaError
from schemas.registry import open_registry
from streaming.batcher import Pipeline
from streaming.config import Settings
from streaming.exceptions import ErrorPolicyError
from streaming.producer import Publisher
from streaming.topics import dead_letter_topic, ensure_topics
from tests.helpers import read_topic

#: The fields of a kafka-python ConsumerRecord the pipeline reads: a plain value object, not a mock.
Msg = namedtuple("Msg", "topic partition offset timestamp key value headers")


def pipeline(settings: Settings, publisher: Publisher, **kw: Any) -> Pipeline:
    registry = open_registry(settings.registry_url, settings.registry_dir)
    return Pipeline(settings, "sensor", namespace="onerror", registry=registry, publisher=publisher,
                    max_seconds=None, **kw)


def garbage(settings: Settings, offset: int) -> Msg:
    return Msg(f"{settings.topic_prefix}sensor.raw", 0, offset, 0, b"k", b"\x00not avro", [])


def test_default_policy_dead_letters_the_record_with_its_stage(settings: Settings) -> None:
    ensure_topics(settings)
    with Publisher(settings) as pub:
        p = pipeline(settings, pub)
        p.process(garbage(settings, 0))
        p.flush_dead_letters()
        pub.settle()
    assert p.stats.dead_letters == 1
    letters = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False)
    assert len(letters) == 1
    headers = dict(letters[0].headers)
    assert b"decode" in b"".join(v for k, v in headers.items() if "stage" in k)


def test_a_policy_can_stop_on_decode_errors_and_is_asked_with_the_stage(settings: Settings) -> None:
    seen: list[tuple[str, str]] = []

    def strict_decode(stage: str, exc: BaseException, record: Any) -> str:
        seen.append((stage, type(exc).__name__))
        return "raise"

    with Publisher(settings) as pub:
        p = pipeline(settings, pub, on_error=strict_decode)
        with pytest.raises(SchemaError):
            p.process(garbage(settings, 0))
    assert seen and seen[0][0] == "decode" and p.stats.dead_letters == 0


def test_a_policy_cannot_skip_a_record(settings: Settings) -> None:
    with Publisher(settings) as pub:
        p = pipeline(settings, pub, on_error=lambda *a: "skip")
        with pytest.raises(ErrorPolicyError, match="never skipped"):
            p.process(garbage(settings, 0))


def test_module_example_runs() -> None:
    result = doctest.testmod(streaming.onerror, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 2
