"""Test suite root. Fixtures live in tests/fixtures/*.py, each loaded as a pytest plugin."""

from pathlib import Path

import pytest

# Fixture modules import each other's helpers; mark the package first so every one of them
# still gets pytest's assertion rewriting, whatever order they load in.
pytest.register_assert_rewrite("fixtures")

pytest_plugins = sorted(
    f"fixtures.{path.stem}"
    for path in (Path(__file__).parent / "fixtures").glob("*.py")
    if not path.name.startswith("_")
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell at teardown whether the
    test failed (the namespace fixture then prints what the cluster held)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
