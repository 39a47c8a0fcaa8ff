"""The package version: pyproject.toml reads it from here, and the loader checks that
liblossc reports the same."""

__version__ = "0.1.0"
