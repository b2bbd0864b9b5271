"""Go durations and Kubernetes quantities, read exactly as the API server reads them."""

from decimal import Decimal

import pytest

from llmserve.operator.units import parse_duration, parse_quantity, same_quantity


@pytest.mark.parametrize("text,seconds", [
    ("0", 0), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400), ("500ms", 0.5), ("2h0m3s", 7203),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "5 minutes", "1d", "m10", "-5s", "1h 30m"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("value,expected", [
    ("500m", Decimal("0.5")), ("1", Decimal(1)), (2, Decimal(2)), ("1Gi", Decimal(2 ** 30)),
    ("1k", Decimal(1000)), ("1e3", Decimal(1000)), ("0.5", Decimal("0.5")), ("256Mi", Decimal(256 * 2 ** 20)),
])
def test_quantities(value, expected):
    assert parse_quantity(value) == expected


def test_quantities_compare_by_value_as_the_api_server_canonicalizes_them():
    assert same_quantity("1000m", "1")
    assert same_quantity("0.5", "500m")
    assert same_quantity(1, "1")
    assert not same_quantity("1Gi", "1G")
    assert not same_quantity("lots", "1")


@pytest.mark.parametrize("value", ["lots", "1.2.3", "", True, "1 Gi"])
def test_bad_quantities_are_refused(value):
    with pytest.raises(ValueError):
        parse_quantity(value)
