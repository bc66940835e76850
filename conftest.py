"""The README's and the docs' code blocks are tests too: Sybil collects them
(tests/docs_examples.py says how each kind of block runs)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))

from docs_examples import sybil  # noqa: E402

pytest_collect_file = sybil.pytest()
