"""Tensors of a dtype an op does not handle (float8, integers) are refused with an error naming the argument,
through the Python API and directly through torch.ops.pyprune_fast.* (the C++ checks, which guard the
kernels when the Python checks are bypassed): a kernel never reads or writes them with another element size."""

import pytest
import torch

from pyprune_fast import masks, ops
from tests.conftest import DEVICES, native_or_skip

FP8 = torch.float8_e4m3fn
BAD = [FP8, torch.int32, torch.int16]


def bad_tensor(dtype, shape=(4, 8), device="cpu"):
    return torch.ones(shape, device=device).to(dtype)


def selection(scores, k):
    value, counts = ops.select_counts(scores, k)
    return value, counts


def raw(t):
    """The bytes of a float8 tensor (torch.equal has no float8 kernel), other tensors as they are."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


@pytest.mark.parametrize("dtype", BAD)
def test_apply_to_of_another_dtype_is_refused_before_anything_is_written(dtype):
    scores = {"w": torch.arange(32.0).reshape(4, 8)}
    target = bad_tensor(dtype)
    before = raw(target).clone()
    for prune in (masks.global_unstructured, masks.layerwise, masks.per_row):
        with pytest.raises(TypeError, match=r"apply_to\['w'\] must be float32, float16, bfloat16 or float64, got"):
            prune(scores, 0.5, apply_to={"w": target})
    assert torch.equal(raw(target), before)


@pytest.mark.parametrize("dtype", BAD)
def test_python_api_refuses_other_dtypes(dtype):
    scores = [torch.arange(32.0).reshape(4, 8)]
    value, counts = selection(scores, 16)
    with pytest.raises(TypeError, match=r"params\[0\] must be one of float32, float16, bfloat16, float64"):
        ops.threshold_apply_([bad_tensor(dtype)], scores, value, counts, 16)
    with pytest.raises(TypeError, match=r"tensors\[0\] must be one of"):
        ops.kth_smallest([bad_tensor(dtype)], 1)
    with pytest.raises(TypeError, match=r"weights\[0\] must be one of|grads\[0\] must be one of"):
        ops.saliency([bad_tensor(dtype)], [bad_tensor(dtype)])


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_value_and_counts_are_checked(device):
    """A float16 value for float64 scores was read as 8 bytes (4 of them past the value): the kernel then
    pruned 1 element instead of 4. Now refused, in Python and in C++."""
    scores = [torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64, device=device)]
    value, counts = selection(scores, 4)
    assert value.item() == 4.0 and counts.tolist() == [3, 1]
    keep = ops.threshold_masks(scores, value, counts, 4)[0]
    assert keep.tolist() == [False, False, False, False, True, True]
    cases = [
        ((value.half(), counts), TypeError, "value must be float64 .the scores' dtype., got float16"),
        ((value.reshape(1, 1).expand(2, 1), counts), ValueError, r"value must hold one element"),
        ((value, counts.int()), TypeError, "counts must be int64, got int32"),
        ((value, torch.cat([counts, counts])), ValueError, r"counts must have shape \(2,\)"),
    ]
    for (v, c), error, match in cases:
        with pytest.raises(error, match=match):
            ops.threshold_masks(scores, v, c, 4)
        with pytest.raises(error, match=match):
            ops.threshold_apply_([scores[0].clone()], scores, v, c, 4)
    native_or_skip(device)
    native_cases = [
        ((value.half(), counts), "value must be a single Double element"),
        ((value.reshape(1, 1).expand(2, 1), counts), "value must be a single Double element"),
        ((value, counts.int()), r"counts must be an int64 tensor of shape \[2\]"),
        ((value, torch.cat([counts, counts])), r"counts must be an int64 tensor of shape \[2\]"),
    ]
    for (v, c), match in native_cases:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.pyprune_fast.threshold_masks(scores, v, c, 4)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.pyprune_fast.threshold_apply_([scores[0].clone()], scores, v, c, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", BAD)
def test_kernels_refuse_other_dtypes_when_called_directly(device, dtype):
    native_or_skip(device)
    lib = torch.ops.pyprune_fast
    scores = [torch.arange(32.0, device=device).reshape(4, 8)]
    value, counts = selection(scores, 16)
    bad = bad_tensor(dtype, device=device)
    param = bad.clone()
    with pytest.raises(RuntimeError, match=r"params\[0\] must be float32, float16, bfloat16 or float64, got"):
        lib.threshold_apply_([param], scores, value, counts, 16)
    assert torch.equal(raw(param), raw(bad))
    refusals = [
        (lambda: lib.saliency([bad], [bad]), "weights must be float32, float16, bfloat16 or float64, got"),
        (lambda: lib.saliency_accumulate_([scores[0].clone()], [bad], [bad], 1.0, 1), "weights must be float32"),
        (lambda: lib.kth_smallest_counts([bad], 1), "xs must be float32, float16, bfloat16 or float64, got"),
        (lambda: lib.radix_histogram([bad], 0, 0), "xs must be float32"),
        (lambda: lib.threshold_masks([bad], value, counts, 16), "xs must be float32"),
        (lambda: lib.layerwise_masks([bad], [1]), "xs must be float32"),
        (lambda: lib.per_row_masks([bad], [1]), "xs must be float32"),
        (lambda: lib.nm_mask([bad], 2, 4), "scores must be float32"),
        (lambda: lib.compress_24(bad_tensor(dtype, (16, 32), device), None), "w must be float32, float16 or bfloat16"),
        (lambda: lib.svd_mean([bad]), r"features\[0\] must be float32 or float64"),
    ]
    for call, match in refusals:
        with pytest.raises(RuntimeError, match=match):
            call()


@pytest.mark.cuda
def test_grads_and_weights_on_different_devices_are_refused_in_cpp():
    native_or_skip("cuda")
    g, w = torch.ones(8, device="cuda"), torch.ones(8)
    with pytest.raises(RuntimeError, match=r"weights\[0\] must be on CUDA, got cpu"):
        torch.ops.pyprune_fast.saliency([g], [w])
    if torch.cuda.device_count() > 1:
        w1 = torch.ones(8, device="cuda:1")
        with pytest.raises(RuntimeError, match=r"grads\[0\] is on cuda:0 but weights\[0\] is on cuda:1"):
            torch.ops.pyprune_fast.saliency([g], [w1])
        with pytest.raises(RuntimeError, match=r"weights\[1\] is on cuda:1 but weights\[0\] is on cuda:0"):
            torch.ops.pyprune_fast.saliency([g, g], [g, w1])


@pytest.mark.cuda
def test_a_cpu_tensor_first_in_a_cuda_call_gets_the_message_naming_it():
    """A list holding a CUDA tensor goes to the CUDA kernel even when its first tensor is on the CPU. The
    kernels built their CUDAGuard from that first tensor before checking the devices, so such a call raised
    c10's internal "CUDAGuardImpl initialized with non-CUDA DeviceType" instead of the message naming it."""
    native_or_skip("cuda")
    lib = torch.ops.pyprune_fast
    cpu, gpu = torch.ones(8), torch.ones(8, device="cuda")
    value, counts = selection([gpu], 4)
    xs_first = r"xs\[0\] must be on CUDA, got cpu"
    calls = [
        (lambda: lib.kth_smallest_counts([cpu, gpu], 1), xs_first),
        (lambda: lib.radix_histogram([cpu, gpu], 0, 0), xs_first),
        (lambda: lib.threshold_masks([cpu, gpu], value, counts, 4), xs_first),
        (lambda: lib.threshold_apply_([gpu.clone(), gpu.clone()], [cpu, gpu], value, counts, 4), xs_first),
        (lambda: lib.layerwise_masks([cpu, gpu], [1, 1]), xs_first),
        (lambda: lib.per_row_masks([cpu, gpu], [1, 1]), xs_first),
        (lambda: lib.nm_mask([cpu, gpu], 2, 4), r"scores\[0\] must be on CUDA, got cpu"),
        (lambda: lib.saliency([gpu, gpu], [cpu, gpu]), r"weights\[0\] must be on CUDA, got cpu"),
        (lambda: lib.saliency_accumulate_([gpu.clone()], [gpu], [cpu], 1.0, 1), r"weights\[0\] must be on CUDA"),
        (lambda: lib.svd_mean([cpu.view(2, 4), gpu.view(2, 4)]), r"features\[0\] must be on CUDA, got cpu"),
    ]
    for call, match in calls:
        with pytest.raises(RuntimeError, match=match) as info:
            call()
        assert "CUDAGuardImpl" not in str(info.value)
