"""argparse types that check ranges at parse time: a bad flag is one `error: argument --x: ...` line, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def number(
    kind: type[int] | type[float],
    *,
    min: float | None = None,  # noqa: A002 - reads best at the call site
    max: float | None = None,  # noqa: A002
    above: float | None = None,
) -> Callable[[str], int | float]:
    """A parser for a number in [min, max] (and > `above`), naming the range when the value is outside it."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if value != value:  # NaN
            raise argparse.ArgumentTypeError("NaN is not a value")
        if min is not None and value < min:
            raise argparse.ArgumentTypeError(f"must be at least {min:g}, not {text}")
        if max is not None and value > max:
            raise argparse.ArgumentTypeError(f"must be at most {max:g}, not {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}, not {text}")
        return value

    return parse


def temperature(text: str) -> float:
    """0 (greedy), or a temperature sampling can use: [0.001, 100]."""
    value = number(float, min=0.0, max=100.0)(text)
    if 0.0 < value < 1e-3:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or at least 0.001, not {text}")
    return float(value)


def deprecated(new_flag: str) -> type[argparse.Action]:
    """The action of an old flag name kept as a hidden alias: stores like `new_flag` and says to use it."""

    class Deprecated(argparse._StoreAction):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"note: {option_string} is deprecated; use {new_flag}", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    return Deprecated
