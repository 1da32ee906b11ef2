"""Fixtures shared across test packages."""

# The `vol` fixture: a volume driven through the real CLI (tier 3).
pytest_plugins = ["tests.walrusfs.clivol"]
