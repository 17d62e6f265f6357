import sys
from pathlib import Path

# Tests import their helpers as a module; the packages themselves come from the install.
sys.path.insert(0, str(Path(__file__).parent))

# Before any test module loads torch: OpenMP threads that spin idle slow a loaded laptop down.
import srmri  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (tests/test_cuda.py)")
