"""Test suite root. Fixtures live in tests/fixtures/*.py, each loaded as a pytest plugin."""

from pathlib import Path

pytest_plugins = sorted(
    f"fixtures.{path.stem}"
    for path in (Path(__file__).parent / "fixtures").glob("*.py")
    if not path.name.startswith("_")
)
