"""The CUDA selection kernels' logic on the CPU: tests/cpp/radix_emulation.cpp compiles the header they
share with the CPU kernels (csrc/include/pyprune_fast/radix.h) for the host and runs their algorithm: the
block-wide bin choice (each of 256 threads owns a range of bins, an exclusive scan of the range counts,
one thread finds the bin), the 11-bit radix passes of kth_smallest_counts and the 8-bit passes and tie
ranking of per_row_masks, and the histogram pass (16-byte vectors with a scalar head and tail, one add per
warp for lanes that share a digit). Compared with select_bin (the one-thread scan it replaces), a plain
histogram and the reference on adversarial inputs: ties, ±0, ±inf, NaN, subnormals, one element, many
equal scores, every histogram shape (32 to 65536 bins, fewer bins than threads, empty bins, k past the
total), every misalignment."""

import os
import random
import shutil
import subprocess

import pytest
import torch

from pyprune_fast import _build, reference

SOURCE = "tests/cpp/radix_emulation.cpp"
FORMATS = {  # dtype: (storage width, mantissa bits, signed int type of the same width)
    torch.float16: (16, 10, torch.int16),
    torch.bfloat16: (16, 7, torch.int16),
    torch.float32: (32, 23, torch.int32),
    torch.float64: (64, 52, torch.int64),
}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++20 compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = str(tmp_path_factory.mktemp("emu") / "radix_emulation")
    include = os.path.join(_build.csrc_dir(), "include")
    subprocess.run([cxx, "-std=c++20", "-O1", f"-I{include}", os.path.join(root, SOURCE), "-o", exe], check=True)

    def ask(lines: list[str]) -> list[str]:
        done = subprocess.run([exe], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        return done.stdout.split("\n")[: len(lines)]

    return ask


def serial_select_bin(hist, k):
    """select_bin written out: the first bin whose inclusive count reaches k (the last one past the total)."""
    cum = 0
    for b, c in enumerate(hist):
        if cum + c >= k:
            return b, cum
        cum += c
    return len(hist) - 1, cum


def histograms():
    """(hist, k) pairs: every bin count of the kernels' digit plans, adversarial shapes and ranks."""
    rng = random.Random(0)
    cases = []
    for bins in (32, 256, 512, 1024, 2048, 65536):
        shapes = {
            "one bin": [0] * bins,
            "first": [0] * bins,
            "last": [0] * bins,
            "part edges": [0] * bins,
            "random": [rng.choice([0, 0, 0, 1, 2, 1000]) for _ in range(bins)],
            "all equal": [3] * bins,
        }
        shapes["one bin"][bins // 3] = 10**12
        shapes["first"][0] = 5
        shapes["last"][-1] = 5
        per = -(-bins // 256)
        for b in range(per - 1, bins, per):  # the last bin of every thread's range
            shapes["part edges"][b] = 1
        for hist in shapes.values():
            total = sum(hist)
            ranks = {1, 2, total, total + 1, max(total - 1, 1), rng.randint(1, max(total, 1))}
            cases += [(hist, k) for k in ranks]
    cases.append(([0] * 2048, 1))  # empty: every count 0, k past the total
    return cases


def test_block_bin_choice_equals_the_serial_scan(emulator):
    cases = histograms()
    lines = [f"bins 256 {k} {len(h)} " + " ".join(map(str, h)) for h, k in cases]
    lines += [f"bins {parts} {k} {len(h)} " + " ".join(map(str, h)) for parts in (1, 3, 64) for h, k in cases[:40]]
    answers = emulator(lines)
    for (hist, k), answer in zip(cases + cases[:40] * 3, answers):
        bin_, below, bin_parts, below_parts, bin_block, below_block, holders = map(int, answer.split())
        assert (bin_, below) == serial_select_bin(hist, k)
        assert (bin_parts, below_parts) == (bin_block, below_block) == (bin_, below), (len(hist), k)
        assert holders == 1, (len(hist), k)  # one thread writes the selection state


def bits_of(x: torch.Tensor) -> list[str]:
    width, _, int_type = FORMATS[x.dtype]
    return [format(v & ((1 << width) - 1), "x") for v in x.reshape(-1).view(int_type).tolist()]


def adversarial(dtype):
    info = torch.finfo(dtype)
    tiny = info.tiny / 4 if dtype != torch.bfloat16 else info.tiny / 2
    g = torch.Generator().manual_seed(3)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), tiny, -tiny, info.max, -info.max])
    return {
        "special": special.to(dtype),
        "ties": (torch.randint(0, 3, (3000,), generator=g).double() - 1).to(dtype),
        "many equal": torch.full((2000,), 0.5, dtype=dtype),
        "signed zeros": torch.tensor([0.0, -0.0] * 50, dtype=dtype),
        "infinities": torch.tensor([float("inf")] * 7 + [float("-inf")] * 5 + [2.0], dtype=dtype),
        "one": torch.tensor([-3.0], dtype=dtype),
        "gaussian": torch.randn(1500, generator=g).to(dtype),
    }


@pytest.mark.parametrize("dtype", list(FORMATS), ids=str)
@pytest.mark.parametrize("digit", [11, 8], ids=["global-11-bit", "row-8-bit"])
def test_radix_passes_equal_the_reference(emulator, dtype, digit):
    width, mantissa, _ = FORMATS[dtype]
    lines, expected = [], []
    for x in adversarial(dtype).values():
        n = x.numel()
        for k in sorted({1, 2, n // 2 + 1, n - 1, n} & set(range(1, n + 1))):
            lines.append(f"select {width} {mantissa} {digit} {k} {n} " + " ".join(bits_of(x)))
            value, counts, nan = reference.kth_smallest_counts([x], k)
            expected.append(f"{bits_of(value)[0]} {int(counts[0])} {int(counts[1])} {int(nan[0])}")
    with_nan = torch.tensor([1.0, float("nan"), -2.0, float("nan")], dtype=dtype)
    lines.append(f"select {width} {mantissa} {digit} 2 4 " + " ".join(bits_of(with_nan)))
    expected.append("0 0 0 2")  # the reference's +0.0 and zero counts, as every backend returns
    assert emulator(lines) == expected


@pytest.mark.parametrize("dtype", list(FORMATS), ids=str)
def test_row_masks_equal_the_reference(emulator, dtype):
    width, mantissa, _ = FORMATS[dtype]
    lines, expected = [], []
    for x in adversarial(dtype).values():
        n = x.numel()
        for count in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            lines.append(f"rowmask {width} {mantissa} {count} {n} " + " ".join(bits_of(x)))
            keep = reference.prune_lowest(x, count)
            expected.append("".join("1" if v else "0" for v in keep.tolist()))
    lines.append(
        f"rowmask {width} {mantissa} 1 3 " + " ".join(bits_of(torch.tensor([1.0, float("nan"), 0.0]).to(dtype)))
    )
    expected.append("nan 1")
    assert emulator(lines) == expected


@pytest.mark.parametrize("dtype", list(FORMATS), ids=str)
def test_histogram_pass_reads_every_element_once_and_counts_it(emulator, dtype):
    """histogram_kernel's 16-byte vectors (a scalar head up to the first 16-byte boundary and a scalar
    tail) at every misalignment and size, and its warp-wide adds of equal digits, against a plain
    histogram; pass 0 with NaN, pass 1 with the prefix of an element."""
    width, mantissa, _ = FORMATS[dtype]
    per_vector = 16 // (width // 8)
    g = torch.Generator().manual_seed(5)
    data = {
        "zeros": torch.zeros(5000, dtype=dtype),
        "ties": (torch.randint(0, 3, (4099,), generator=g).double() - 1).to(dtype),
        "gaussian": torch.randn(2 * 256 * per_vector + 7, generator=g).to(dtype),
        "special": torch.tensor([float("nan"), 0.0, -0.0, float("inf"), float("-inf"), 1.0] * 40, dtype=dtype),
    }
    lines, names = [], []
    for name, x in data.items():
        key = int(reference.order_keys(x[1:2])[0]) & ((1 << width) - 1)
        for misalign in range(per_vector):
            for n in sorted({0, 1, per_vector - 1, per_vector + 1, x.numel()}):
                values = " ".join(bits_of(x[:n]))
                lines.append(f"hist {width} {mantissa} 0 0 {misalign} {n} {values}")
                lines.append(f"hist {width} {mantissa} 1 {key:x} {misalign} {n} {values}")
                names += [(name, misalign, n, 0), (name, misalign, n, 1)]
    answers = emulator(lines)
    for name, answer in zip(names, answers):
        assert answer.startswith("ok "), (name, answer)
    zeros = [a for (name, _, n, _), a in zip(names, answers) if name == "zeros" and n == 5000]
    assert all(int(a.split()[2]) > 0 for a in zeros)  # the equal scores went through the warp-wide add
