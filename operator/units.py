"""Parsers for the two value formats the LLMService API shares with Kubernetes.

Durations use Go's syntax (``90s``, ``10m``, ``1h30m``) because the CRD validates them with CEL's
``duration()``; quantities use Kubernetes' resource syntax (``500m``, ``1Gi``). The operator must
read both exactly as the API server does, and must compare quantities by value because the API
server rewrites them into canonical form (``1000m`` comes back as ``1``); comparing the strings
would make the operator "repair" a child that is already right, forever.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"), "ms": Decimal("1e-3"),
    "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600),
}

_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$")
_QUANTITY_SUFFIXES = {
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"),
    "T": Decimal("1e12"), "P": Decimal("1e15"), "E": Decimal("1e18"),
}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string such as ``10m`` or ``1h30m``; ValueError otherwise."""
    text = text.strip()
    if text == "0":
        return 0.0
    pos, total = 0, Decimal(0)
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += Decimal(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(f"invalid duration {text!r} (use Go syntax such as 90s, 10m or 1h30m)")
    return float(total)


def parse_quantity(value: str | int | float) -> Decimal:
    """The numeric value of a Kubernetes resource quantity (``500m`` -> 0.5, ``1Gi`` -> 1073741824)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}")
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"invalid quantity {value!r}")
    number, exponent, suffix = match.groups()
    try:
        result = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"invalid quantity {value!r}") from exc
    if exponent:
        result *= Decimal(10) ** int(exponent[1:])
    if suffix:
        result *= _QUANTITY_SUFFIXES[suffix]
    return result


def same_quantity(a: object, b: object) -> bool:
    """Whether two quantity values are equal by value; unparsable values compare as written."""
    try:
        return parse_quantity(a) == parse_quantity(b)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return a == b
