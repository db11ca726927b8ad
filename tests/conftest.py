import os
import sys

# The spawned ranks import test modules and the helper by name.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "across_ranks: the test spawns ranks of its own")
