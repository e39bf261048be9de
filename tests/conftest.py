import os
import sys

# tests import the flat top-level scripts (model.py, sample.py, ...) directly
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
