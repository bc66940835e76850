"""Slice -> Python module text (the payload) -> standalone script."""
