"""mpify: run a Python function on N ranked processes, the notebook kernel being rank 0."""
__version__ = "0.2.0"
