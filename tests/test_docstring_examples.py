"""The runnable examples in the public classes' docstrings (issue 15, item 8), run as doctests.

``Publisher`` and ``Subscriber`` run against the session's embedded broker with a fresh topic
prefix (their examples share it: the subscriber reads back what the publisher sent);
``ModelSpec`` builds a real Keras model; the source contract's example runs in
tests/test_ingest_sources.py.
"""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

import streaming.consumer
import streaming.producer
from streaming.config import Settings


def run_examples(module: ModuleType, names: list[str], globs: dict[str, object]) -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = {t.name.rsplit(".", 1)[-1]: t for t in finder.find(module, globs={**vars(module), **globs})}
    for name in names:
        test = tests.get(name)
        assert test is not None and test.examples, f"{module.__name__}.{name} has no docstring example"
        test.globs.update(globs)
        result = runner.run(test, out=lambda text: pytest.fail(text))
        assert result.failed == 0 and result.attempted >= 2, result


def test_publisher_and_subscriber_examples_run_against_the_broker(settings: Settings) -> None:
    run_examples(streaming.producer, ["Publisher"], {"settings": settings})
    run_examples(streaming.consumer, ["Subscriber"], {"settings": settings})


def test_model_spec_example_builds_a_model() -> None:
    import trainer.spec

    run_examples(trainer.spec, ["ModelSpec"], {})
