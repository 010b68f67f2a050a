"""The multi-tensor CUDA ops (saliency, nm_mask, the selection ops) copy a table of pointers from pinned host
memory on every call, which a CUDA graph replay would not repeat: during a capture they raise instead of
recording a copy whose host buffer is freed (or reused) before the replay."""

import pytest
import torch

from tests.conftest import native_or_skip


@pytest.mark.cuda
def test_multi_tensor_ops_refuse_graph_capture():
    native_or_skip("cuda")
    lib = torch.ops.pyprune_fast
    x = torch.randn(64, 32, device="cuda")
    value, counts, _ = lib.kth_smallest_counts([x], 10)
    calls = {
        "kth_smallest_counts": lambda: lib.kth_smallest_counts([x], 10),
        "threshold_masks": lambda: lib.threshold_masks([x], value, counts, 10),
        "layerwise_masks": lambda: lib.layerwise_masks([x], [10]),
        "saliency": lambda: lib.saliency([x], [x]),
        "nm_mask": lambda: lib.nm_mask([x], 2, 4),
    }
    torch.cuda.synchronize()
    for call in calls.values():
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="cannot run during CUDA graph capture"):
            with torch.cuda.graph(graph):
                call()
        torch.cuda.synchronize()
    lib.kth_smallest_counts([x], 10)  # outside a capture they run as before
