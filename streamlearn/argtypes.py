"""argparse ``type=`` functions for the command line's numbers: one place that bounds them.

Why: a plain ``type=int``/``type=float`` let through what no command can use, and each was found the
hard way: ``--generate -1`` and ``--sensors 0`` ended in a ValueError traceback, ``--idle-exit nan``
never exited, ``--generate`` with 23 digits ran for ever dead-lettering timestamps before 1970,
``--from-offset -5`` was a traceback. Each type here refuses such a value as a usage error (exit 2)
that names the flag's rule, before anything starts. Settings (``streaming.config``) bound the flags
that set them; these are for the flags that are the command's own.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

#: The largest Kafka offset (int64).
MAX_OFFSET = 2**63 - 1
#: The largest numpy/Python random seed the generators take (numpy: 0..2**32-1 for a legacy seed; the
#: generators use ``default_rng``, which takes any non-negative int, but a bound keeps ids printable).
MAX_SEED = 2**32 - 1
#: Demo generators: more events than this is not a demo (and a sensor history that long runs back
#: before 1970, where every reading is dead-lettered).
MAX_GENERATE = 100_000_000


def whole(lo: int = 0, hi: int | None = None, what: str = "a whole number") -> Callable[[str], int]:
    """An int in ``lo..hi`` (``hi`` None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {what}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"{n}: give at least {lo}")
        if hi is not None and n > hi:
            raise argparse.ArgumentTypeError(f"{str(n)[:40]}: give at most {hi}")
        return n

    parse.__name__ = "whole number"  # argparse names the type in its "invalid ... value" message
    return parse


def finite(lo: float = 0.0, hi: float = 10 * 365 * 86_400.0, *, above: bool = False,
           what: str = "a number") -> Callable[[str], float]:
    """A finite float in ``lo..hi`` (``above``: strictly more than ``lo``). NaN and infinity are refused:
    a NaN compares false with everything, so a wait of NaN seconds never ended."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {what}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{text[:40]}: give a finite number")
        if x < lo or (above and x == lo):
            raise argparse.ArgumentTypeError(f"{text[:40]}: give {'more than' if above else 'at least'} {lo:g}")
        if x > hi:
            raise argparse.ArgumentTypeError(f"{text[:40]}: give at most {hi:g}")
        return x

    parse.__name__ = "number"
    return parse


def seconds(lo: float = 0.0, hi: float = 10 * 365 * 86_400.0, *, above: bool = False) -> Callable[[str], float]:
    """A duration in seconds: :func:`finite`, up to ten years by default."""
    return finite(lo, hi, above=above, what="a number of seconds")


def offset_arg(text: str) -> int:
    """A Kafka offset: 0..2**63-1 (-5 was a ValueError traceback, 20 digits an OverflowError one)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an offset (a whole number from 0)") from None
    if not 0 <= n <= MAX_OFFSET:
        raise argparse.ArgumentTypeError(f"{str(n)[:40]} is not an offset: offsets run from 0 to {MAX_OFFSET}")
    return n


#: A count of at least 1 (``--max-records -1`` printed one record).
count_arg = whole(1)
#: A TCP port to listen on; 0 asks the system for a free one.
port_arg = whole(0, 65_535, "a port number")
seed_arg = whole(0, MAX_SEED, "a seed (a whole number from 0)")
generate_arg = whole(0, MAX_GENERATE)
