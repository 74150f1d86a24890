"""Regenerate examples/requests.jsonl: five digit images as raw ImageEvent objects, one JSON per line.

``streamlearn predict digits_cnn --file examples/requests.jsonl`` sends them as prediction requests.
The images are the scikit-learn digits the demo generator uses (nothing from ../shared); the file is
committed so the README works without running this, and tests/test_examples.py checks it is current.

Run from the repository root: ``python examples/make_requests.py > examples/requests.jsonl``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator


def lines(n: int = 5) -> Iterator[str]:
    from ingest.generators import digits
    from streaming.jsoncodec import to_json

    for event in digits(n, seed=0, start_ms=1_700_000_000_000):
        yield to_json(event)


if __name__ == "__main__":
    sys.path.insert(0, ".")
    for line in lines():
        print(line)
