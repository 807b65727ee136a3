"""The suite's one piece of set-up: the repository and tests/ on the import path, so that every folder's
tests import the project's files (and tests/reading.py) however pytest is started."""
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(TESTS), TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)
