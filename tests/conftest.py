import sys
from pathlib import Path

# Tests import their helpers as a module; the packages themselves come from the install.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (tests/test_cuda.py)")
