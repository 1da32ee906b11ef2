"""Fixtures shared across test packages."""

# The `vol` fixture: a volume driven through the real CLI (tier 3). `leftovers`: no mount
# outlives the run that made it, nor fails a later run.
pytest_plugins = ["tests.walrusfs.clivol", "tests.leftovers"]
