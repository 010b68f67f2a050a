import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--run-large", action="store_true", help="run tests marked large (many GB, minutes)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_large = pytest.mark.skip(reason="large: run with --run-large")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "large" in item.keywords and not config.getoption("--run-large"):
            item.add_marker(skip_large)


def pytest_report_header(config):
    import pyprune_fast

    info = pyprune_fast.backend_info()
    return [
        f"pyprune_fast backend: {info['backend']} ({info['build'] or info['reason']}); "
        f"cpu_ops={info['cpu_ops']} cuda_ops={info['cuda_ops']} cuda_archs={info['cuda_archs']}; "
        f"PYPRUNE_FAST_BACKEND={os.environ.get('PYPRUNE_FAST_BACKEND', 'auto')}"
    ]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def native_or_skip(device: str) -> None:
    """Skips the test unless compiled kernels serve tensors on `device`."""
    from pyprune_fast import _extension

    if not _extension.native_available(device):
        pytest.skip(f"no compiled {device} kernels loaded ({_extension.state()['reason']})")
