"""The package version, in a leaf module so that anything may import it without importing `lite`'s lazy API."""

__version__ = "0.1.0"
