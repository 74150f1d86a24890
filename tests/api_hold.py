"""A wrapper of the streamlearn CLI for the control-API job tests: ``api_hold.py RELEASE WORDS...``.

It prints ``holding``, waits (bounded, 120 s) until the file RELEASE exists, then runs
``streamlearn WORDS...`` in this process. Why: a job test needs a child that is still running while
the test looks at it, cancels it or restarts the API, without a slow command; the runner, the
process group, the signals and (after the release) the real command and its output are the product's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    release, words = Path(sys.argv[1]), sys.argv[2:]
    print("holding", flush=True)
    deadline = time.monotonic() + 120
    while not release.exists():
        if time.monotonic() > deadline:
            print("error: api_hold: never released", flush=True)
            return 9
        time.sleep(0.05)  # a bounded wait for a file the test writes
    from streamlearn.cli import main as cli

    return cli(words)


if __name__ == "__main__":
    sys.exit(main())
