"""The block node server (`hafs node`)."""
