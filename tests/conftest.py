import os
import sys

# The spawned ranks import test modules and the helper by name.
sys.path.insert(0, os.path.dirname(__file__))
