"""loramix's version: the one source of it (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
