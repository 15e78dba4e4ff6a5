"""gpucoin: an open market for deep-learning training compute (see README.md)."""

__version__ = "0.1.0"
