"""hafs: a high-availability filesystem in user space."""

__version__ = "0.1.0"
