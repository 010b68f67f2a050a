import pytest

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def native_or_skip(device: str) -> None:
    """Skips the test unless compiled kernels serve tensors on `device`."""
    import pyprune_fast

    info = pyprune_fast.backend_info()
    if not info[f"{device}_ops"]:
        pytest.skip(f"no compiled {device} kernels loaded ({info['reason'] or info.get('cuda_reason')})")
