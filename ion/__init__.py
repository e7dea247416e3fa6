"""ION: a Twisted capability container and the data pump that runs on it."""

__version__ = "0.1.0"
