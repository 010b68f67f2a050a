"""2:4 compression, its tensor-core metadata layout (proved on the host by emulating mma.sp), and
sparse24_linear against the dense masked product."""

import pytest
import torch
import torch.nn.functional as F

import pyprune_fast
from pyprune_fast import ops, reference
from pyprune_fast.reference import mma_sp as emu
from pyprune_fast.sparse import SparseLinear
from tests.conftest import DEVICES, native_or_skip

VALID_NIBBLES = {0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110}  # (i0, i1) with i0 < i1, i0 in the low bits


def random_24(out, cols, dtype=torch.float32, device="cpu", seed=0, integer=False):
    """A 2:4 weight (2 kept of every 4 by random scores) and its keep-mask."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-4, 5, (out, cols), generator=g).float() if integer else torch.randn(out, cols, generator=g)
    keep = reference.n_m({"w": torch.rand(out, cols, generator=g)}, 2, 4)["w"]
    return (w * keep).to(device=device, dtype=dtype), keep.to(device)


def meta_by_definition(w):
    """The metadata words of w written out from the layout's definition (sparse24.h), one chunk at a time."""
    out, cols = w.shape
    words = [0] * (out * cols // 32)
    for r in range(out):
        for c in range(cols // 4):
            nonzero = [j for j in range(4) if w[r, 4 * c + j] != 0]
            i0, i1 = (nonzero + [j for j in range(4) if j not in nonzero])[:2]
            i0, i1 = min(i0, i1), max(i0, i1)
            word = ((r // 16) * (cols // 32) + c // 8) * 16 + 2 * (r % 8) + (c // 4) % 2
            words[word] |= (i0 | i1 << 2) << (16 * ((r // 8) % 2) + 4 * (c % 4))
    return torch.tensor([v - 2**32 if v >= 2**31 else v for v in words], dtype=torch.int32).view(
        out // 16, cols // 32, 16
    )


# --- compression ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(16, 32), (64, 128), (48, 96), (32, 224)])
def test_round_trip_and_reference(device, dtype, shape):
    w, _ = random_24(*shape, dtype=dtype, device=device, seed=shape[0] + shape[1])
    values, meta = ops.compress_24(w)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype and values.device == w.device
    assert meta.shape == (shape[0] // 16, shape[1] // 32, 16) and meta.dtype == torch.int32
    assert torch.equal(ops.decompress_24(values, meta), w)
    ref_values, ref_meta, invalid = reference.compress_24(w.cpu())
    assert int(invalid) == 0
    assert torch.equal(values.cpu(), ref_values) and torch.equal(meta.cpu(), ref_meta)


@pytest.mark.parametrize("device", DEVICES)
def test_meta_layout_follows_its_definition(device):
    w, _ = random_24(48, 96, device=device, seed=5, integer=True)  # integer weights: some kept entries are 0
    _, meta = ops.compress_24(w)
    assert torch.equal(meta.cpu(), meta_by_definition(w.cpu()))
    nibbles = reference.unpack_meta(meta.cpu())
    assert set(nibbles.unique().tolist()) <= VALID_NIBBLES


@pytest.mark.parametrize("device", DEVICES)
def test_padding_of_chunks_with_fewer_than_two_non_zeros(device):
    w = torch.zeros(16, 32, device=device)
    w[0, 3] = 1.0  # chunk 0: only position 3 -> kept (0, 3)
    w[0, 5] = -0.0  # chunk 1: nothing non-zero -> (0, 1)
    w[1, 6] = float("inf")  # chunk 1 of row 1: position 2 -> (0, 2)
    w[2, 8:10] = torch.tensor([float("nan"), 2.0])  # NaN counts as non-zero: (0, 1)
    values, meta = ops.compress_24(w)
    nibbles = reference.unpack_meta(meta.cpu())
    assert nibbles[0, 0] == 0b1100 and nibbles[0, 1] == 0b0100 and nibbles[1, 1] == 0b1000 and nibbles[2, 2] == 0b0100
    dense = ops.decompress_24(values, meta)
    torch.testing.assert_close(dense, w, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_compress_with_a_mask(device, dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g).to(device=device, dtype=dtype)  # dense: not 2:4 by itself
    keep = reference.n_m({"w": torch.rand(32, 64, generator=g)}, 2, 4)["w"].to(device)
    w[0, :4] = 0  # a kept entry that is 0 stays in its masked position
    values, meta = ops.compress_24(w, keep)
    assert torch.equal(ops.decompress_24(values, meta), w * keep)
    ref_values, ref_meta, _ = reference.compress_24(w.cpu(), keep.cpu())
    assert torch.equal(values.cpu(), ref_values) and torch.equal(meta.cpu(), ref_meta)


@pytest.mark.parametrize("device", DEVICES)
def test_not_24_is_an_error(device):
    w, keep = random_24(16, 32, device=device)
    w[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"w is not 2:4 sparse: 1 of its 128 groups"):
        ops.compress_24(w)
    keep[2, :4] = True
    with pytest.raises(ValueError, match=r"mask must keep exactly 2 of every 4 .* 1 of 128 do not"):
        ops.compress_24(w, keep)
    values, meta = ops.compress_24(w * reference.n_m({"w": w.abs().cpu()}, 2, 4)["w"].to(device))
    meta[0, 0, 3] = 0  # eight chunks with the pair (0, 0)
    with pytest.raises(ValueError, match="meta holds 8 groups whose index pair is not an ordered 2:4 pair"):
        ops.decompress_24(values, meta)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: ops.compress_24(torch.ones(16, 48)), ValueError, r"in % 32 == 0, got shape \(16, 48\)"),
        (lambda: ops.compress_24(torch.ones(8, 32)), ValueError, r"out % 16 == 0"),
        (lambda: ops.compress_24(torch.ones(16, 32, dtype=torch.int32)), TypeError, r"^w must be one of"),
        (lambda: ops.compress_24(torch.ones(16, 32), torch.ones(16, 32)), TypeError, "mask must be a bool tensor"),
        (
            lambda: ops.compress_24(torch.ones(16, 32), torch.ones(16, 64, dtype=torch.bool)),
            ValueError,
            "mask has shape",
        ),
        (lambda: ops.decompress_24(torch.ones(16, 16), torch.zeros(1, 1, 16)), TypeError, "meta must be int32"),
        (
            lambda: ops.decompress_24(torch.ones(16, 16), torch.zeros(1, 2, 16, dtype=torch.int32)),
            ValueError,
            r"meta must have shape \(1, 1, 16\)",
        ),
    ],
)
def test_bad_compression_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- the host emulation of mma.sp: the metadata layout computes the product -------------------------


def isa_fragments(a_dense, b_dense, c_dense, selector):
    """Per-lane registers of one m16n8k32 built from dense A (2:4), B and C with the PTX ISA's stated
    fragment formulas (groupID = lane >> 2, threadID_in_group = lane % 4), independently of the emulator."""
    a = torch.zeros(32, 4, 2, dtype=torch.float64)
    b = torch.zeros(32, 4, 2, dtype=torch.float64)
    c = torch.zeros(32, 4, dtype=torch.float64)
    e = torch.zeros(32, dtype=torch.int64)
    for lane in range(32):
        gid, tig = lane >> 2, lane % 4
        for i in range(8):  # a_i: rows gid for i in {0,1,4,5}, else gid + 8; columns 4 tig (+16 for i >= 4)
            row = gid if i in (0, 1, 4, 5) else gid + 8
            first = tig * 4 + (16 if i >= 4 else 0)
            kept = [j for j in range(4) if a_dense[row, first + j] != 0]
            kept = (kept + [j for j in range(4) if j not in kept])[:2]
            a[lane, i // 2, i % 2] = a_dense[row, first + sorted(kept)[i % 2]]
        for j in range(4):
            for q in range(2):
                b[lane, j, q] = b_dense[8 * j + 2 * tig + q, gid]
        c[lane] = torch.stack(
            [c_dense[gid, 2 * tig], c_dense[gid, 2 * tig + 1], c_dense[gid + 8, 2 * tig], c_dense[gid + 8, 2 * tig + 1]]
        )
        if tig // 2 == selector:  # lanes 2f, 2f + 1 of the group: chunks 4p..4p+3 of rows gid (low half), gid + 8
            p = tig % 2
            for h, row in enumerate((gid, gid + 8)):
                for q in range(4):
                    first = 16 * p + 4 * q
                    kept = [j for j in range(4) if a_dense[row, first + j] != 0]
                    i0, i1 = sorted((kept + [j for j in range(4) if j not in kept])[:2])
                    e[lane] |= (i0 | i1 << 2) << (16 * h + 4 * q)
    return a, b, c, e


@pytest.mark.parametrize("selector", [0, 1])
def test_emulated_instruction_computes_a_times_b_plus_c(selector):
    w, _ = random_24(16, 32, seed=11, integer=True)
    g = torch.Generator().manual_seed(12)
    b_dense = torch.randint(-5, 6, (32, 8), generator=g).double()
    c_dense = torch.randint(-5, 6, (16, 8), generator=g).double()
    a, b, c, e = isa_fragments(w.double(), b_dense, c_dense, selector)
    d = emu.mma_sp_m16n8k32(a, b, c, e, selector)
    expected = w.double() @ b_dense + c_dense
    gid, tig = torch.arange(32) // 4, torch.arange(32) % 4
    assert torch.equal(d[:, 0], expected[gid, 2 * tig]) and torch.equal(d[:, 1], expected[gid, 2 * tig + 1])
    assert torch.equal(d[:, 2], expected[gid + 8, 2 * tig]) and torch.equal(d[:, 3], expected[gid + 8, 2 * tig + 1])


@pytest.mark.parametrize("selector", [0, 1])
def test_compressed_words_are_the_instruction_operand(selector):
    """compress_24's values and meta, read by lanes as the kernel reads them, give A·B on the emulator."""
    w, _ = random_24(16, 32, seed=21, integer=True)
    values, meta = ops.compress_24(w)
    g = torch.Generator().manual_seed(22)
    b_dense = torch.randint(-5, 6, (32, 8), generator=g).double()
    _, b, c, _ = isa_fragments(w.double(), b_dense, torch.zeros(16, 8, dtype=torch.float64), selector)
    lanes = torch.arange(32)
    gid, tig = lanes >> 2, lanes & 3
    # a[r] = values of chunk tig (+4 for r >= 2) of row gid (+8 for odd r): compressed columns 2 * chunk
    a = torch.stack(
        [
            values.double()[gid + 8 * (r % 2)].gather(1, (2 * (tig + 4 * (r // 2))).view(32, 1) + torch.arange(2))
            for r in range(4)
        ],
        1,
    )
    e = meta.view(-1).long()[2 * gid + (lanes & 1)] & 0xFFFFFFFF
    d = emu.mma_sp_m16n8k32(a, b, c, e, selector)
    expected = w.double() @ b_dense
    assert torch.equal(d[:, 0], expected[gid, 2 * tig]) and torch.equal(d[:, 3], expected[gid + 8, 2 * tig + 1])


@pytest.mark.parametrize("tile", emu.TILES, ids=lambda t: f"{t.bm}x{t.bn}")
@pytest.mark.parametrize("activation", [None, "relu"])
def test_emulated_kernel_equals_the_dense_product(tile, activation):
    """csrc/cuda/sparse24_linear.cu's tile loop, every ldmatrix and mma.sp emulated lane by lane, on
    integer data (exact in float64): tails of tokens, bias and activation included."""
    out, cols = (128, 128) if tile.bm == 128 else (128, 192)
    w, _ = random_24(out, cols, seed=tile.bn, integer=True)
    values, meta = ops.compress_24(w)
    g = torch.Generator().manual_seed(tile.bm)
    tokens = tile.bn + 3 if tile.bn < 128 else 131
    x = torch.randint(-3, 4, (tokens, cols), generator=g).float()
    bias = torch.randint(-9, 10, (out,), generator=g).float()
    y = emu.emulate_sparse24_linear(x, values, meta, bias, activation, tile)
    expected = F.linear(x.double(), w.double(), bias.double())
    assert torch.equal(y, torch.relu(expected) if activation else expected)


def test_emulated_kernel_gelu_and_selector_one():
    w, _ = random_24(64, 64, seed=3)
    values, meta = ops.compress_24(w)
    x = torch.randn(21, 64, generator=torch.Generator().manual_seed(4))
    y = emu.emulate_sparse24_linear(x, values, meta, None, "gelu", emu.TILES[2], selector=1)
    torch.testing.assert_close(y, F.gelu(F.linear(x.double(), w.double())), rtol=1e-12, atol=1e-12)


def test_emulation_rejects_a_wrong_layout():
    """The proof has teeth: metadata in another layout (row-major nibbles, or the two column halves of a
    tile swapped) does not compute the product."""
    w, _ = random_24(64, 64, seed=8, integer=True)
    values, meta = ops.compress_24(w)
    x = torch.randint(-3, 4, (16, 64), generator=torch.Generator().manual_seed(9)).float()
    expected = F.linear(x.double(), w.double())
    swapped = meta.view(4, 2, 8, 2).flip(-1).reshape(meta.shape)  # lanes t and t ^ 1 exchange their words
    row_major = reference.pack_meta(reference.unpack_meta(meta)).view(-1)[torch.randperm(meta.numel())].view(meta.shape)
    for wrong in (swapped, row_major):
        try:
            y = emu.emulate_sparse24_linear(x, values, wrong, tile=emu.TILES[2])
        except ValueError:  # an unordered pair: undefined behaviour, caught
            continue
        assert not torch.equal(y, expected)


def test_ldmatrix_emulation():
    smem = torch.arange(4 * 8 * 16, dtype=torch.float64)
    rows = torch.arange(32) * 16  # lane l points at row l: matrix l // 8, row l % 8
    r = emu.ldmatrix_x4(smem, rows)
    lane = torch.arange(32)
    for j in range(4):  # register j: row lane // 4 of matrix j, elements 2 (lane % 4), + 1
        assert torch.equal(r[:, j, 0], smem[(8 * j + lane // 4) * 16 + 2 * (lane % 4)])
        assert torch.equal(r[:, j, 1], smem[(8 * j + lane // 4) * 16 + 2 * (lane % 4) + 1])


# --- sparse24_linear on CPU -------------------------------------------------------------------------


def dense_expected(x, w, bias, activation):
    """act(F.linear) in float32, rounded once to x's dtype."""
    y = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    y = {None: y, "relu": torch.relu(y), "gelu": F.gelu(y)}[activation]
    return y.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cpu_equals_masked_dense(dtype, activation, with_bias):
    w, keep = random_24(128, 192, dtype=dtype, seed=2)
    values, meta = ops.compress_24(w)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 192, generator=g).to(dtype)
    bias = torch.randn(128, generator=g).to(dtype) if with_bias else None
    y = ops.sparse24_linear(x, values, meta, bias, activation)
    assert y.shape == (2, 37, 128) and y.dtype == dtype
    torch.testing.assert_close(y, dense_expected(x, w, bias, activation), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, reference.sparse24_linear(x, values, meta, bias, activation or "none"))


def test_linear_cpu_any_token_count_and_layout():
    w, _ = random_24(64, 128, seed=4)
    values, meta = ops.compress_24(w)
    for x in (torch.randn(0, 128), torch.randn(128), torch.randn(130, 3, 256)[:, 1, ::2], torch.randn(3, 0, 128)):
        y = ops.sparse24_linear(x, values, meta)
        assert y.shape == (*x.shape[:-1], 64)
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_linear_with_no_input_features(device, activation):
    """in = 0 passes every check (0 is a multiple of 64), then x.reshape(-1, 0) failed in both kernels
    (the size of -1 cannot be inferred from 0 elements). y = act(bias), or act(0) without a bias, as
    F.linear and the reference give."""
    native_or_skip(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    values, meta = ops.compress_24(torch.zeros(64, 0, dtype=dtype, device=device))
    assert values.shape == (64, 0) and meta.shape == (4, 0, 16)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(64, generator=g).to(device=device, dtype=dtype)
    for x in (torch.zeros(3, 5, 0, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device)):
        for b in (bias, None):
            y = ops.sparse24_linear(x, values, meta, b, activation)
            expected = reference.sparse24_linear(x, values, meta, b, activation or "none")
            assert y.shape == (*x.shape[:-1], 64) and y.dtype == dtype
            assert torch.equal(y, expected)


def test_linear_gradients_in_x_and_bias():
    w, _ = random_24(64, 64, seed=6, dtype=torch.float64)
    values, meta = ops.compress_24(w.float())
    x = torch.randn(5, 64, dtype=torch.float32, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    for activation in (None, "relu", "gelu"):
        y = ops.sparse24_linear(x, values, meta, bias, activation)
        gx, gb = torch.autograd.grad(y.square().sum(), (x, bias))
        xr, br = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        yr = dense_expected(xr, w.float(), br, activation)
        ex, eb = torch.autograd.grad(yr.square().sum(), (xr, br))
        torch.testing.assert_close(gx, ex, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gb, eb, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not differentiable in values"):
        ops.sparse24_linear(x, values.requires_grad_(), meta)


@pytest.mark.parametrize(
    "args,error,match",
    [
        (
            (torch.ones(3, 96), torch.ones(64, 48), torch.zeros(4, 3, 16, dtype=torch.int32)),
            ValueError,
            "in=96, out=64",
        ),
        ((torch.ones(3, 128), torch.ones(64, 32), torch.zeros(4, 2, 16, dtype=torch.int32)), ValueError, "x must be"),
        ((torch.ones(3, 128).half(), torch.ones(64, 64), torch.zeros(4, 4, 16, dtype=torch.int32)), TypeError, "x is"),
        ((torch.ones(3, 128), torch.ones(64, 64), torch.zeros(4, 4, 16)), TypeError, "meta must be int32"),
    ],
)
def test_bad_linear_input(args, error, match):
    with pytest.raises(error, match=match):
        ops.sparse24_linear(*args)


def test_bad_linear_bias_and_activation():
    values, meta = ops.compress_24(random_24(64, 64)[0])
    x = torch.ones(2, 64)
    with pytest.raises(ValueError, match="activation must be None, 'relu' or 'gelu', got 'tanh'"):
        ops.sparse24_linear(x, values, meta, activation="tanh")
    with pytest.raises(ValueError, match=r"bias must be a \[64\]"):
        ops.sparse24_linear(x, values, meta, torch.ones(32))
    bad = meta.clone()
    bad[0, 0, 0] = 0
    with pytest.raises((ValueError, RuntimeError), match="not .*ordered 2:4 pair"):
        ops.sparse24_linear(x, values, bad)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    native_or_skip(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    w, keep = random_24(64, 128, dtype=dtype, device=device)
    values, meta = ops.compress_24(w)
    x = torch.randn(5, 128, device=device, dtype=dtype)
    bias = torch.randn(64, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.pyprune_fast.compress_24.default, (w, keep))
    torch.library.opcheck(torch.ops.pyprune_fast.decompress_24.default, (values, meta))
    torch.library.opcheck(torch.ops.pyprune_fast.sparse24_linear.default, (x, values, meta, bias, "gelu"))


# --- the CUDA kernel (needs a GPU) ------------------------------------------------------------------

CUDA_TOLERANCE = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}
TOKENS = [1, 5, 16, 17, 33, 64, 65, 127, 128, 129, 300, 1000, 2055]


def cuda_case(out, cols, tokens, dtype, seed=0):
    w, _ = random_24(out, cols, dtype=dtype, device="cuda", seed=seed)
    w = (w.float() / cols**0.5).to(dtype)  # outputs of order 1
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, cols, generator=g).to(device="cuda", dtype=dtype)
    bias = torch.randn(out, generator=g).to(device="cuda", dtype=dtype)
    return w, x, bias


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 64), (128, 192), (192, 256), (768, 3072), (3072, 768)])
def test_cuda_kernel_equals_masked_dense_for_every_token_count(dtype, shape):
    native_or_skip("cuda")
    out, cols = shape
    for tokens in TOKENS:
        w, x, bias = cuda_case(out, cols, tokens, dtype, seed=tokens)
        values, meta = ops.compress_24(w)
        for activation in (None, "relu", "gelu"):
            y = ops.sparse24_linear(x, values, meta, bias, activation)
            expected = dense_expected(x, w, bias, activation)
            torch.testing.assert_close(y, expected, **CUDA_TOLERANCE[dtype], msg=f"{shape} {tokens} {activation}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_on_llm_shapes_and_layouts(dtype):
    native_or_skip("cuda")
    for out, cols, tokens in [(4096, 4096, 2048), (11008, 4096, 77), (4096, 11008, 9), (4096, 4096, 8192)]:
        w, x, bias = cuda_case(out, cols, tokens, dtype, seed=out + tokens)
        values, meta = ops.compress_24(w)
        torch.testing.assert_close(
            ops.sparse24_linear(x, values, meta, bias), dense_expected(x, w, bias, None), **CUDA_TOLERANCE[dtype]
        )
    w, x, _ = cuda_case(256, 512, 300, dtype)
    values, meta = ops.compress_24(w)
    x3 = x.view(3, 100, 512)
    misaligned = torch.empty(300 * 512 + 1, device="cuda", dtype=dtype)[1:].view(300, 512).copy_(x)
    for xi in (x3, x.t().contiguous().t(), misaligned, x[::2]):
        torch.testing.assert_close(
            ops.sparse24_linear(xi, values, meta), dense_expected(xi, w, None, None), **CUDA_TOLERANCE[dtype]
        )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_torch_semi_structured(dtype):
    native_or_skip("cuda")
    from torch.sparse import to_sparse_semi_structured

    for out, cols, tokens in [(768, 3072, 128), (3072, 768, 256), (4096, 4096, 64)]:
        w, x, bias = cuda_case(out, cols, tokens, dtype, seed=out)
        try:
            theirs = F.linear(x, to_sparse_semi_structured(w), bias)
        except (RuntimeError, NotImplementedError) as exc:  # their backends do not cover every GPU and shape
            pytest.skip(f"torch's 2:4 path is unavailable here: {exc}")
        values, meta = ops.compress_24(w)
        torch.testing.assert_close(ops.sparse24_linear(x, values, meta, bias), theirs, **CUDA_TOLERANCE[dtype])


@pytest.mark.cuda
def test_cuda_compression_matches_cpu_and_float32_is_refused():
    native_or_skip("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        w, keep = random_24(256, 512, dtype=dtype, seed=9)
        cpu = ops.compress_24(w, keep)
        gpu = ops.compress_24(w.cuda(), keep.cuda())
        assert all(torch.equal(c, g.cpu()) for c, g in zip(cpu, gpu))
        assert torch.equal(ops.decompress_24(*gpu).cpu(), w * keep)
    values, meta = ops.compress_24(random_24(64, 64, device="cuda")[0])
    with pytest.raises(TypeError, match="needs float16 or bfloat16"):
        ops.sparse24_linear(torch.ones(2, 64, device="cuda"), values, meta)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_with_no_output_features_or_no_tokens_is_empty(device):
    """A grid of zero blocks is a launch error on CUDA: empty results are returned without a launch."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    for out, tokens in [(0, 5), (64, 0), (0, 0)]:
        values, meta = ops.compress_24(torch.zeros(out, 64, dtype=dtype, device=device))
        x = torch.ones(2, tokens, 64, dtype=dtype, device=device)
        bias = torch.ones(out, dtype=dtype, device=device)
        y = ops.sparse24_linear(x, values, meta, bias)
        assert y.shape == (2, tokens, out) and y.dtype == dtype and y.device == x.device
        if pyprune_fast.backend_info()[f"{device}_ops"]:
            direct = torch.ops.pyprune_fast.sparse24_linear(x, values, meta, bias, "none")
            assert direct.shape == (2, tokens, out)
        if device == "cuda":
            torch.cuda.synchronize()
    layer = SparseLinear.from_compressed(*ops.compress_24(torch.zeros(0, 64, dtype=dtype, device=device)))
    assert layer(torch.ones(7, 64, dtype=dtype, device=device)).shape == (7, 0)
