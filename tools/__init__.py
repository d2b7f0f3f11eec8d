"""Tools that build real reference models from pinned PyPI wheels (not part of the installed package)."""
