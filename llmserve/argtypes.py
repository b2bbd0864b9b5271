"""argparse `type=` checks shared by the subcommands, so bad flags fail the same way everywhere.

Standard library only: the operator image, the predictor image and the model-puller init
container all import it without the test bed or the build tool.
"""

from __future__ import annotations

import argparse


def whole_number(value: str, *, minimum: int) -> int:
    """`value` as an int of at least `minimum`, or an argparse error that names the bound."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return number


def positive_int(value: str) -> int:
    return whole_number(value, minimum=1)


def non_negative_int(value: str) -> int:
    return whole_number(value, minimum=0)


def tcp_port(value: str) -> int:
    port = positive_int(value)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return port


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number

