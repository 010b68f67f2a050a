"""svd_mean / svd_mean_list (Gram matrix + batched eigensolver) against torch.linalg.svdvals with
autograd, on random, rank-deficient, zero and non-finite inputs; gradcheck; opcheck; errors.

Tolerances. The op computes σ_i = sqrt(λ_i) from the eigenvalues λ_i of the Gram matrix, whose rounding
error is about eps·λ_max: each σ_i is off by about eps·κ_i·σ_max (κ_i = σ_max / σ_i) and the gradient
U Vᵀ / k by about eps·κ² relative, κ = σ_max / σ_min (singular values below sqrt(k·eps)·σ_max count as
zero). The expected values here come from torch.linalg.svdvals in float64 on the same inputs; the test
matrices have κ ≤ 10 (κ ≈ 1.5 ... 4 for the Gaussian N ≪ D ones), so
  float64: values rtol 1e-10, gradients atol 1e-10 · max|grad|
  float32 (and fp16/bf16 inputs, computed in float32): values rtol 2e-5, gradients atol 2e-4 · max|grad|.
"""

import os
import subprocess
import sys

import pytest
import torch

from pyprune_fast import ops, reference
from tests.conftest import DEVICES, native_or_skip

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-4)}


def conditioned(shape, dtype, device, seed=0, cond=4.0):
    """[..., N, D] matrices U diag(s) Vᵀ with singular values spread over [1, cond]."""
    g = torch.Generator().manual_seed(seed)
    *batch, n, d = shape
    k = min(n, d)
    u = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(*batch, d, k, generator=g, dtype=torch.float64)).Q
    s = 1 + (cond - 1) * torch.rand(*batch, k, generator=g, dtype=torch.float64)
    return ((u * s.unsqueeze(-2)) @ v.mT).to(device=device, dtype=dtype)


def gaussian(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def expected(features: torch.Tensor, weights: torch.Tensor):
    """Value and gradient of Σ_b weights_b · mean σ(F_b) by torch.linalg.svdvals in float64."""
    x = features.detach().double().requires_grad_(True)
    value = torch.linalg.svdvals(x).mean(-1)
    (grad,) = torch.autograd.grad((value * weights.double()).sum(), x)
    return value, grad


def ours(fn, features, weights):
    x = features.detach().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad((value * weights.to(value.dtype)).sum(), x)
    return value, grad


def assert_matches(value, grad, ref_value, ref_grad, dtype):
    rtol, gtol = TOL[dtype]
    torch.testing.assert_close(value.double().cpu(), ref_value.cpu(), rtol=rtol, atol=0)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=0, atol=gtol * scale)


SHAPES = {
    "N<D": (3, 16, 70),
    "N>D": (3, 70, 16),
    "N=D": (2, 12, 12),
    "B=1": (1, 9, 40),
    "matrix": (8, 30),
    "1x1": (1, 1),
    "row": (1, 37),
    "column": (37, 1),
    "odd tails": (2, 13, 16390 + 53),  # several column segments, tails of every kernel
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_value_and_gradient_match_svdvals(device, dtype, case):
    shape = SHAPES[case]
    f = conditioned(shape, dtype, device, seed=len(case))
    weights = torch.linspace(-1.0, 2.0, shape[0] if len(shape) == 3 else 1, device=device).reshape(shape[:-2])
    value, grad = ours(ops.svd_mean, f, weights)
    assert value.shape == shape[:-2] and value.dtype == dtype and grad.dtype == dtype and grad.shape == f.shape
    assert_matches(value, grad, *expected(f, weights), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gaussian_features(device, dtype):
    f = gaussian((4, 24, 3000), dtype, device, seed=3)
    weights = torch.tensor([1.0, -0.5, 0.25, 3.0], device=device)
    value, grad = ours(ops.svd_mean, f, weights)
    assert_matches(value, grad, *expected(f, weights), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_are_computed_in_float32(device, dtype):
    f = conditioned((2, 10, 50), dtype, device, seed=5)
    weights = torch.tensor([1.0, 2.0], device=device)
    value, grad = ours(ops.svd_mean, f, weights)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    ref_value, ref_grad = expected(f, weights)
    torch.testing.assert_close(value.double().cpu(), ref_value.cpu(), rtol=2e-5, atol=0)
    # the gradient is rounded to the input's half type at the end
    half_eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=half_eps, atol=2e-4 * ref_grad.abs().max())
    assert torch.equal(ops.svd_mean(f), ops.svd_mean(f.float()))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    for shape in [(2, 4, 9), (9, 4), (5, 5)]:
        f = conditioned(shape, torch.float64, device, seed=7).requires_grad_(True)
        assert torch.autograd.gradcheck(ops.svd_mean, (f,))
    mats = [conditioned((4, d), torch.float64, device, seed=d).requires_grad_(True) for d in (3, 4, 11)]
    assert torch.autograd.gradcheck(lambda *m: ops.svd_mean_list(list(m)), tuple(mats))


EXTREME_SCALES = {torch.float32: [1e19, 1e30, 1e38, 1e-20, 1e-30, 1e-37], torch.float64: [1e160, 1e300, 1e-160, 1e-300]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["ops", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_extreme_magnitudes(device, backend, dtype):
    """Unscaled, the Gram matrix overflowed (NaN from 1e19 in float32, 1e160 in float64)
    or fell below the eigenvalue cutoff (0 with a zero gradient below 1e-20). Each matrix is now scaled by
    a power of two: values scale with the input, gradients do not, both within the usual tolerances of
    torch.linalg.svdvals in float64 on the same (rounded) inputs. Upstream weights as large as the
    features do not overflow the gradient (it never holds 2**e · grad)."""
    fn = {"ops": ops.svd_mean, "reference": reference.svd_mean}[backend]
    base = conditioned((3, 7, 19), torch.float64, device, seed=41)
    for scale in EXTREME_SCALES[dtype]:
        f = (base * scale).to(dtype)
        weights = torch.tensor([1.0, -2.0, scale if dtype == torch.float64 else 1e30], device=device, dtype=dtype)
        value, grad = ours(fn, f, weights)
        ref_value, ref_grad = expected(f, weights)
        assert value.isfinite().all() and grad.isfinite().all(), scale
        assert_matches(value, grad, ref_value, ref_grad, dtype)
        assert_matches(value[:2], grad[:2], ref_value[:2], expected(base.to(dtype), weights)[1][:2], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_subnormal_and_mixed_magnitude_list(device):
    """One float32 list: a matrix of subnormal entries, a huge one and an ordinary one (each its own
    scale). The subnormal matrix's value is itself subnormal: rounded to a multiple of 2**-149."""
    base = conditioned((6, 11), torch.float64, device, seed=43)
    mats = [(base * s).float().requires_grad_(True) for s in (1e-40, 1e37, 1.0)]
    assert mats[0].abs().max() < torch.finfo(torch.float32).tiny
    values = ops.svd_mean_list(mats)
    grads = torch.autograd.grad(values.sum(), mats)
    for i, m in enumerate(mats):
        ref_value, ref_grad = expected(m, torch.ones((), device=device))
        atol = 2.0**-149 if i == 0 else 0.0
        torch.testing.assert_close(values[i].double().cpu(), ref_value.cpu(), rtol=2e-5, atol=atol)
        torch.testing.assert_close(grads[i].double().cpu(), ref_grad.cpu(), rtol=0, atol=2e-4 * ref_grad.abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_scaled_float64(device):
    """The scaled paths of both backends (max|F| far from [0.5, 1)) against finite differences."""
    for scale in (2.0**-30, 3.0e9):
        f = (conditioned((2, 4, 9), torch.float64, device, seed=47) * scale).requires_grad_(True)
        for fn in (ops.svd_mean, reference.svd_mean):
            assert torch.autograd.gradcheck(fn, (f,), eps=1e-6 * scale, atol=1e-8)


def minimum_norm(f: torch.Tensor, rank: int):
    """Σ_{i<rank} σ_i / k and U_r V_rᵀ / k: the value and minimum-norm subgradient of a rank-r matrix."""
    u, s, vh = torch.linalg.svd(f.double(), full_matrices=False)
    k = s.shape[-1]
    return s[..., :rank].sum(-1) / k, u[..., :rank] @ vh[..., :rank, :] / k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (12, 12)], ids=["N<D", "N>D", "N=D"])
def test_rank_deficient_gives_minimum_norm_subgradient(device, dtype, shape):
    g = torch.Generator().manual_seed(11)
    rank = 5
    f64 = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, shape[1], generator=g, dtype=torch.float64
    )
    f = f64.to(device=device, dtype=dtype)
    value, grad = ours(ops.svd_mean, f, torch.ones((), device=device))
    assert torch.isfinite(grad).all()
    ref_value, ref_grad = minimum_norm(f, rank)
    rtol, gtol = TOL[dtype]
    torch.testing.assert_close(value.double().cpu(), ref_value.cpu(), rtol=rtol, atol=0)
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=0, atol=gtol * ref_grad.abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_zero_and_repeated_rows(device):
    f = gaussian((3, 8, 30), torch.float64, device, seed=13)
    f[0] = 0  # all zero: value 0, gradient 0
    f[1, 4:] = 0  # rank 4
    f[2, 4:] = f[2, :4]  # rank 4, repeated rows
    value, grad = ours(ops.svd_mean, f, torch.ones(3, device=device))
    assert torch.isfinite(grad).all()
    assert value[0].item() == 0 and torch.count_nonzero(grad[0]).item() == 0
    for b in (1, 2):
        ref_value, ref_grad = minimum_norm(f[b], 4)
        torch.testing.assert_close(value[b].cpu(), ref_value.cpu(), rtol=1e-10, atol=0)
        torch.testing.assert_close(grad[b].cpu(), ref_grad.cpu(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_all_zero_input(device, dtype):
    for shape in [(2, 5, 9), (9, 5), (1, 1)]:
        f = torch.zeros(shape, device=device, dtype=dtype)
        value, grad = ours(ops.svd_mean, f, torch.ones(shape[:-2], device=device))
        assert torch.count_nonzero(value).item() == 0 and torch.count_nonzero(grad).item() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_svd_mean_list_mixed_widths(device, dtype):
    n = 12
    widths = [40, 5, 12, 300, 5, 7, 40]  # Gram sizes 12 (D >= N), 5, 5, 7: three eigensolver batches
    mats = [conditioned((n, d), dtype, device, seed=i) for i, d in enumerate(widths)]
    xs = [m.detach().requires_grad_(True) for m in mats]
    weights = torch.arange(1.0, len(widths) + 1, device=device)
    values = ops.svd_mean_list(xs)
    grads = torch.autograd.grad((values * weights.to(dtype)).sum(), xs)
    assert values.shape == (len(widths),) and values.dtype == dtype
    for i, m in enumerate(mats):
        ref_value, ref_grad = expected(m, weights[i])
        assert_matches(values[i], grads[i], ref_value, ref_grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_list_and_batch_agree(device):
    f = gaussian((5, 16, 200), torch.float32, device, seed=17)
    assert torch.equal(ops.svd_mean_list(list(f)), ops.svd_mean(f))
    assert torch.equal(ops.svd_mean(f[2]), ops.svd_mean(f)[2])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_list_is_computed_in_float64(device):
    a, b = gaussian((6, 20), torch.float32, device), gaussian((6, 9), torch.float64, device, seed=1)
    values = ops.svd_mean_list([a, b])
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, torch.stack([ops.svd_mean(a.double()), ops.svd_mean(b)]))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = gaussian((3, 40, 26), torch.float64, device, seed=19)
    for f in [base.mT, base[:, ::2, 1:], base.permute(1, 0, 2)[:, :, :9].permute(1, 0, 2)]:
        weights = torch.ones(f.shape[0], device=device)
        value, grad = ours(ops.svd_mean, f, weights)
        assert_matches(value, grad, *expected(f, weights), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_matrices_give_nan_and_leave_the_others(device):
    f = gaussian((4, 6, 20), torch.float32, device, seed=23)
    f[1, 2, 3] = float("nan")
    f[2, 0, 0] = float("inf")
    value, grad = ours(ops.svd_mean, f, torch.ones(4, device=device))
    assert value[1].isnan() and value[2].isnan()
    assert grad[1].isnan().all() and grad[2].isnan().all()
    keep = torch.tensor([0, 3], device=device)
    assert_matches(value[keep], grad[keep], *expected(f[keep], torch.ones(2, device=device)), torch.float32)


def test_reference_non_finite_matrices_give_nan():
    """The reference follows the op's contract (torch.linalg.svdvals raises on NaN entries)."""
    f = gaussian((3, 5, 8), torch.float64, "cpu", seed=31)
    f[0, 1, 1] = float("nan")
    f[1, 0, 2] = float("-inf")
    value = reference.svd_mean(f)
    assert value[:2].isnan().all()
    torch.testing.assert_close(value[2], torch.linalg.svdvals(f[2]).mean())
    torch.testing.assert_close(ops.svd_mean(f), value, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    f = torch.zeros((0, 4, 7), device=device, requires_grad=True)
    value = ops.svd_mean(f)
    assert value.shape == (0,)
    (grad,) = torch.autograd.grad(value.sum(), f)
    assert grad.shape == f.shape


def test_results_do_not_depend_on_the_thread_count():
    f = gaussian((3, 20, 40000), torch.float32, "cpu", seed=29).requires_grad_(True)
    threads = torch.get_num_threads()
    results = []
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        try:
            value = ops.svd_mean(f)
            results.append((value, torch.autograd.grad(value.sum(), f)[0]))
        finally:
            torch.set_num_threads(threads)
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    f = gaussian((2, 6, 15), torch.float32, device).requires_grad_(True)
    mats = [gaussian((5, d), torch.float64, device, seed=d).requires_grad_(True) for d in (3, 8, 8)]
    torch.library.opcheck(torch.ops.pyprune_fast.svd_mean, ([f],))
    torch.library.opcheck(torch.ops.pyprune_fast.svd_mean, (mats,))
    values, factors = torch.ops.pyprune_fast.svd_mean([m.detach() for m in mats])
    grad = torch.ones_like(values)
    torch.library.opcheck(torch.ops.pyprune_fast.svd_mean_backward, (grad, [m.detach() for m in mats], factors))


@pytest.mark.cuda
def test_cuda_value_and_gradient_do_not_synchronize():
    for n in (16, 64):  # the two cuSOLVER paths: syevjBatched (n <= 32) and XsyevBatched
        f = gaussian((3, n, 500), torch.float32, "cuda").requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            value = ops.svd_mean(f)
            (grad,) = torch.autograd.grad(value.sum(), f)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_matches(value, grad, *expected(f, torch.ones(3, device="cuda")), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [2, 32, 33, 128, 256])
def test_cuda_eigensolver_sizes(n):
    f = conditioned((4, n, 2 * n + 3), torch.float32, "cuda", seed=n)
    weights = torch.ones(4, device="cuda")
    value, grad = ours(ops.svd_mean, f, weights)
    assert_matches(value, grad, *expected(f, weights), torch.float32)


def test_errors():
    with pytest.raises(TypeError, match="features must be a Tensor, got list"):
        ops.svd_mean([torch.ones(2, 2)])
    with pytest.raises(ValueError, match=r"features\[0\] must be \[N, D\] or \[B, N, D\], got shape \(4,\)"):
        ops.svd_mean(torch.ones(4))
    with pytest.raises(ValueError, match=r"must be \[N, D\] or \[B, N, D\], got shape \(1, 2, 3, 4\)"):
        ops.svd_mean(torch.ones(1, 2, 3, 4))
    with pytest.raises(TypeError, match=r"features\[0\] must be one of float32, float16, bfloat16, float64, got int64"):
        ops.svd_mean(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features\[0\] must have N > 0 and D > 0"):
        ops.svd_mean(torch.ones(3, 0))
    with pytest.raises(ValueError, match="features must hold at least one"):
        ops.svd_mean_list([])
    with pytest.raises(TypeError, match="features must be a list of tensors, got Tensor"):
        ops.svd_mean_list(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"features\[1\] must be a 2-d \[N, D\] matrix, got shape \(1, 4, 5\)"):
        ops.svd_mean_list([torch.ones(4, 5), torch.ones(1, 4, 5)])
    with pytest.raises(ValueError, match=r"features\[2\] has N = 5 rows but features\[0\] has 4"):
        ops.svd_mean_list([torch.ones(4, 5), torch.ones(4, 2), torch.ones(5, 5)])
    with pytest.raises(TypeError, match=r"features\[1\] must be one of"):
        ops.svd_mean_list([torch.ones(4, 5), torch.ones(4, 5, dtype=torch.int32)])


def test_op_errors():
    op = torch.ops.pyprune_fast.svd_mean
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        op([torch.ones(3, 3, dtype=torch.half)])
    with pytest.raises(RuntimeError, match=r"features\[1\] is Double but features\[0\] is Float"):
        op([torch.ones(3, 3), torch.ones(3, 3, dtype=torch.double)])
    values, factors = op([torch.randn(3, 4)])
    with pytest.raises(RuntimeError, match=r"grad must have shape \[1\]"):
        torch.ops.pyprune_fast.svd_mean_backward(torch.ones(2), [torch.randn(3, 4)], factors)
    with pytest.raises(RuntimeError, match=r"factors\[0\] must be a Float \[1, 3, 3\] tensor"):
        torch.ops.pyprune_fast.svd_mean_backward(values, [torch.randn(3, 4)], [torch.ones(4, 4)])


@pytest.mark.cuda
def test_device_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"features\[1\] is on cuda:0 but features\[0\] is on cpu"):
        ops.svd_mean_list([torch.ones(3, 4), torch.ones(3, 4, device="cuda")])


def test_reference_matches_definition():
    f = gaussian((2, 5, 8), torch.float64, "cpu")
    torch.testing.assert_close(reference.svd_mean(f), torch.linalg.svdvals(f).mean(-1))


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_narrower_vector_kernels(capability):
    """The AVX2 and baseline CPU kernels (chosen like ATen's, here through ATEN_CPU_CAPABILITY)."""
    code = (
        "import torch\n"
        "from pyprune_fast import ops\n"
        "from tests.test_svd_mean import SHAPES, conditioned, expected, ours, assert_matches\n"
        "for dtype in (torch.float32, torch.float64):\n"
        "    for case in ('N<D', 'N>D', 'odd tails', 'row'):\n"
        "        shape = SHAPES[case]\n"
        "        f = conditioned(shape, dtype, 'cpu', seed=len(case))\n"
        "        w = torch.linspace(-1.0, 2.0, shape[0] if len(shape) == 3 else 1).reshape(shape[:-2])\n"
        "        assert_matches(*ours(ops.svd_mean, f, w), *expected(f, w), dtype)\n"
        "print('ok', torch.backends.cpu.get_cpu_capability())\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["ok", capability.upper()]


@pytest.mark.cuda
def test_cuda_gram_matrices_are_full_float32_with_tf32_allowed():
    """TF32 matmuls (torch.set_float32_matmul_precision("high"), common in training scripts) round the
    inputs of the Gram matrices to 10 mantissa bits, ~1e-3 relative on the values; the op computes them in
    full float32 whatever that setting says: its errors against float64 stay within a small multiple of the
    CPU's (float32 Gram matrices too) on the same inputs, for both cuSOLVER paths and both Gram sides."""
    precision = torch.get_float32_matmul_precision()
    for shape in [(4, 24, 2048), (4, 96, 2048), (2, 2048, 48)]:
        f = gaussian(shape, torch.float32, "cpu", seed=shape[1])
        weights = torch.ones(shape[0])
        exact_value, exact_grad = expected(f, weights)
        cpu_value, cpu_grad = ours(ops.svd_mean, f, weights)
        torch.set_float32_matmul_precision("high")
        try:
            cuda_value, cuda_grad = ours(ops.svd_mean, f.cuda(), weights.cuda())
        finally:
            torch.set_float32_matmul_precision(precision)
        for cpu, cuda, exact in ((cpu_value, cuda_value, exact_value), (cpu_grad, cuda_grad, exact_grad)):
            cpu_error = (cpu.double() - exact).abs().max().item()
            cuda_error = (cuda.double().cpu() - exact).abs().max().item()
            floor = 4 * 2.0**-24 * exact.abs().max().item()  # a few float32 roundings of the largest entry
            assert cuda_error <= 8 * cpu_error + floor, (shape, cuda_error, cpu_error)


@pytest.mark.cuda
@pytest.mark.large
def test_jacobi_batches_past_the_int_limits():
    """Gram matrices of size <= 32 go to cuSOLVER's syevjBatched, whose workspace size (lwork) and batch are
    ints: 2^21 + 3 matrices of 32 x 32 (more than 2^31 elements in one batch) went to one call. The calls
    are now split; values of matrices at the start, around the splits and at the end match svdvals.
    About 9 GB of input, ~45 GB of GPU memory in all."""
    native_or_skip("cuda")
    count = 2**21 + 3
    f = torch.randn(count, 32, 32, device="cuda")
    values = ops.svd_mean(f)
    assert values.shape == (count,) and bool(torch.isfinite(values).all())
    picks = torch.tensor([0, 1, 2**20 - 1, 2**20, 2**20 + 1, 2**21 - 1, 2**21, count - 1], device="cuda")
    expected = torch.linalg.svdvals(f[picks].double()).mean(-1)
    torch.testing.assert_close(values[picks].double(), expected, rtol=1e-3, atol=0)  # square Gaussian: kappa up to ~1e3
