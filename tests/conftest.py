import pytest

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def native_or_skip(device: str) -> None:
    """Skips the test unless compiled kernels serve tensors on `device`."""
    from pyprune_fast import _extension

    if not _extension.native_available(device):
        pytest.skip(f"no compiled {device} kernels loaded ({_extension.state()['reason']})")
