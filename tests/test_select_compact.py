"""The CUDA selection's candidate compaction (csrc/cuda/select.cu, csrc/include/pyprune_fast/select_compact.h)
through its CPU emulation, pyprune_fast/reference/select_compact.py: bit-identical to reference/select.py on
adversarial inputs (all equal, ties at the k-th value, ±inf, ±0, NaN, k = 1 and n, fewer scores than the
sample, brackets made to miss and buffers made to overflow, which must fall back to the full passes),
the cost of each path in passes over the scores, and the emulation's plan, sample positions and decision
against the header's own functions compiled for the host (tests/cpp/compact_emulation.cpp, which also runs
the compaction pass's block loop: stage bound, every candidate written once). On a GPU, the op under
PYPRUNE_FAST_SELECT_PATH=compact and =full against the reference."""

import os
import shutil
import subprocess

import pytest
import torch

from pyprune_fast import _build, reference
from pyprune_fast.reference import select_compact as sc
from tests.conftest import native_or_skip

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_OF = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
PASSES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 3, torch.float64: 6}  # 11-bit digits


def bits(value: torch.Tensor) -> int:
    return int(value.reshape(1).view(INT_OF[value.dtype])[0])


def planted(x: torch.Tensor, values) -> torch.Tensor:
    """x with the elements the sample reads (n = x.numel()) replaced by `values` (in sample order)."""
    x = x.clone()
    m = min(x.numel(), sc.COMPACT_SAMPLE)
    x.view(-1)[torch.tensor(sc.sample_positions(x.numel(), m))] = torch.as_tensor(values, dtype=x.dtype)
    return x


def cases(dtype):
    """name: (tensors, ranks, the path each rank must take or None)."""
    g = torch.Generator().manual_seed(11)
    n = 60_000
    gauss = torch.randn(n, generator=g)
    info = torch.finfo(dtype)
    specials = torch.tensor([float("-inf"), -1.0, -0.0, 0.0, 1.0, float("inf"), info.tiny, -info.max, info.max])
    special = specials[torch.randint(0, len(specials), (30_000,), generator=g)]
    zeros = gauss * (torch.rand(n, generator=g) > 0.5)
    mass_low = torch.where(torch.rand(n, generator=g) < 0.7, torch.tensor(-1.0), torch.rand(n, generator=g))
    mass_high = torch.where(torch.rand(n, generator=g) < 0.7, torch.tensor(2.0), torch.rand(n, generator=g))
    with_nan = gauss.clone()
    with_nan[123] = float("nan")
    half = sc.COMPACT_SAMPLE // 2
    split = [0.0] * half + [1.0] * half  # the sample: 0s then 1s; every other score 0.5
    everything = [0, 1, n // 3, n // 2, n - 1, n]
    return {
        "gaussian": ([gauss], everything, "candidates"),
        "all equal": ([torch.full((40_000,), 0.5)], [20_000, 40_000], "lo"),
        "all equal, k = 1 (no lower bound)": ([torch.full((40_000,), 0.5)], [1], "hi"),
        "ties at the k-th (half zeros)": ([zeros], everything, None),
        "±inf ±0 specials": ([special], [1, 2, 7_000, 15_000, 29_999, 30_000], None),
        "signed zeros": ([torch.tensor([0.0, -0.0] * 10_000)], [1, 10_000, 20_000], None),
        "fewer than the sample": ([torch.randn(37, generator=g)], [1, 5, 19, 37], None),
        "one": ([torch.tensor([-3.0])], [1], "candidates"),
        "several tensors": (
            [
                torch.randn(37, generator=g),
                torch.empty(0),
                torch.randn(65, 33, generator=g),
                torch.tensor([0.0]),
                gauss[:20_001],
            ],
            [1, 10_000, 22_183],
            None,
        ),
        "k-th = lo": ([mass_low], [int(0.6 * n)], "lo"),
        "k-th = hi": ([mass_high], [int(0.3 * n) + 400], "hi"),
        "NaN": ([with_nan], [1, n // 2], "nan"),
        "miss low (sample all large)": ([planted(gauss, 1e4)], [n // 2, n - sc.COMPACT_SAMPLE], "miss-low"),
        "miss high (sample all small)": ([planted(gauss, -1e4)], [sc.COMPACT_SAMPLE + 1, n // 2], "miss-high"),
        "overflow": ([planted(torch.full((n,), 0.5), split)], [n // 2], "overflow"),
    }


def all_cases():
    for dtype in DTYPES:
        for name, (xs, ranks, path) in cases(dtype).items():
            xs = [x.to(dtype) for x in xs]
            total = sum(x.numel() for x in xs)
            for k in sorted({min(max(k, 1), total) for k in ranks}):
                yield dtype, name, xs, k, path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compaction_equals_the_reference_bit_for_bit(dtype):
    seen = set()
    for _, name, xs, k, path in (c for c in all_cases() if c[0] == dtype):
        value, counts, nan, trace = sc.kth_smallest_counts(xs, k)
        ref_value, ref_counts, ref_nan = reference.kth_smallest_counts(xs, k)
        assert value.dtype == dtype and bits(value) == bits(ref_value), (name, k)
        assert counts.tolist() == ref_counts.tolist(), (name, k)
        assert nan.tolist() == ref_nan.tolist(), (name, k)
        if path is not None:
            assert trace.path == path, (name, k, trace)
        seen.add(trace.path)
    # every path of the decision was taken, the fallbacks included
    assert seen >= {"candidates", "lo", "hi", "nan", "miss-low", "miss-high", "overflow"}


def test_full_schedule_and_auto_below_the_threshold_read_everything_per_pass():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    for schedule in ("full", "auto"):  # 50 000 < COMPACT_MIN_ELEMENTS
        value, counts, _, trace = sc.kth_smallest_counts([x], 20_000, schedule)
        ref_value, ref_counts, _ = reference.kth_smallest_counts([x], 20_000)
        assert bits(value) == bits(ref_value) and counts.tolist() == ref_counts.tolist()
        assert trace.path == "full" and trace.passes == 3
    with pytest.raises(ValueError, match="schedule must be"):
        sc.kth_smallest_counts([x], 1, "fast")


def test_cost_of_each_path_in_passes():
    """A hit reads the sample, then the scores once, writes the candidates and reads them once per digit;
    a fallback adds the full passes."""
    n = 200_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(4))
    plan = sc.compact_plan(n, n // 2)
    _, _, _, hit = sc.kth_smallest_counts([x], n // 2)
    assert hit.path == "candidates" and 0 < hit.candidates <= plan.capacity
    assert hit.passes * n == pytest.approx(plan.m + n + hit.candidates * (1 + PASSES[torch.float32]))
    _, _, _, miss = sc.kth_smallest_counts([planted(x, 1e4)], n // 2)
    assert miss.path == "miss-low"
    assert miss.passes * n == pytest.approx(plan.m + n + min(miss.candidates, plan.capacity) + 3 * n)


def test_average_reading_of_fp32_is_at_most_1_3_passes():
    """Random score sets of a pruning run (|N(0,1)|, uniform, log-normal, a half-pruned model's zeros,
    several tensors of different scales) and random ranks: every one a hit, and on average at most 1.3
    passes over the scores (the full schedule: 3)."""
    g = torch.Generator().manual_seed(7)
    passes = []
    for trial in range(16):
        n = int(torch.randint(150_000, 600_000, (1,), generator=g))
        kind = trial % 4
        if kind == 0:
            xs = [torch.randn(n, generator=g).abs()]
        elif kind == 1:
            xs = [torch.rand(n, generator=g)]
        elif kind == 2:
            xs = [torch.randn(n, generator=g).exp() * (torch.rand(n, generator=g) > 0.5)]
        else:
            xs = [torch.randn(n // 4, generator=g) * 10**i for i in range(4)]
        total = sum(x.numel() for x in xs)
        k = int(torch.randint(1, total + 1, (1,), generator=g))
        value, counts, _, trace = sc.kth_smallest_counts(xs, k)
        ref_value, ref_counts, _ = reference.kth_smallest_counts(xs, k)
        assert bits(value) == bits(ref_value) and counts.tolist() == ref_counts.tolist()
        assert trace.path in ("candidates", "lo", "hi"), (trial, trace)
        passes.append(trace.passes)
    assert sum(passes) / len(passes) <= 1.3, passes


def test_sample_positions_one_per_stratum():
    for n, m in [(5, 5), (100, 7), (16_385, 16_384), (10**9, 16_384)]:
        pos = sc.sample_positions(n, m)
        assert len(pos) == m
        for i, p in enumerate(pos):
            assert i * n // m <= p < (i + 1) * n // m


@pytest.fixture(scope="module")
def header():
    """tests/cpp/compact_emulation.cpp built against select_compact.h: plan, positions, decide, pass."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++20 compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"compact_emulation_{os.getpid()}")
    include = os.path.join(_build.csrc_dir(), "include")
    source = os.path.join(root, "tests", "cpp", "compact_emulation.cpp")
    subprocess.run([cxx, "-std=c++20", "-O1", f"-I{include}", source, "-o", exe], check=True)

    def ask(lines: list[str]) -> list[str]:
        done = subprocess.run([exe], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        return done.stdout.split("\n")[: len(lines)]

    yield ask
    os.remove(exe)


def test_emulation_uses_the_headers_plan_positions_and_decision(header):
    pairs = []
    for n in [1, 2, 37, 16_383, 16_384, 16_385, 10**6, 123_456_789, 10**9, 2**40]:
        pairs += [(n, k) for k in sorted({1, 2, n // 3, n // 2, n - 1, n}) if 1 <= k <= n]
    plans = header([f"plan {n} {k}" for n, k in pairs])
    for (n, k), answer in zip(pairs, plans):
        p = sc.compact_plan(n, k)
        assert answer == f"{p.m} {p.r_lo} {p.r_hi} {p.capacity}", (n, k)
    for n, m in [(37, 37), (100_003, 16_384), (10**9, 16_384)]:
        assert header([f"positions {n} {m}"])[0] == " ".join(map(str, sc.sample_positions(n, m)))
    codes = {"full": 0, "candidates": 1, "done": 2}
    lines, expected = [], []
    for k in (1, 3, 5, 6, 9, 12, 13):
        for lo, hi in ((3, 9), (4, 4)):
            for counted in ((2, 2, 1, 4), (0, 0, 0, 0), (5, 3, 2, 1), (1, 1, 1, 9)):
                for capacity, nan in ((10, 0), (3, 0), (10, 2)):
                    lines.append(f"decide {k} {lo} {hi} {' '.join(map(str, counted))} {capacity} {nan}")
                    path = sc.decide(k, lo, hi, counted, capacity, nan)
                    below, eq_lo, eq_hi, cand = counted
                    if path in ("lo", "hi", "nan"):
                        prefix, rank, less, equal = {
                            "lo": (lo, 0, below, eq_lo),
                            "hi": (hi, 0, below + eq_lo + cand, eq_hi),
                            "nan": (0, k, 0, 0),
                        }[path]
                        expected.append(f"2 {prefix} {rank} {less} {equal}")
                    elif path == "candidates":
                        expected.append(f"1 0 {k - below - eq_lo} {below + eq_lo} 0")
                    else:
                        expected.append(f"{codes['full']} 0 {k} 0 0")
    assert header(lines) == expected


FORMATS = {torch.float16: (16, 10), torch.bfloat16: (16, 7), torch.float32: (32, 23), torch.float64: (64, 52)}


def hex_bits(x: torch.Tensor) -> list[str]:
    width = FORMATS[x.dtype][0]
    return [format(v & ((1 << width) - 1), "x") for v in x.reshape(-1).view(INT_OF[x.dtype]).tolist()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compaction_pass_counts_and_writes_every_candidate_once(header, dtype):
    """compact_kernel's loop over one chunk (the largest, 65536 scores, and odd sizes, at every
    misalignment): the counts of each class equal the emulation's comparisons, the stage never holds more
    than its slots (every score a candidate included), and the flushes write each candidate once."""
    width, mantissa = FORMATS[dtype]
    per_vector = 16 // (width // 8)
    g = torch.Generator().manual_seed(9)
    gauss = torch.randn(65_536, generator=g).to(dtype)
    special = torch.tensor([float("nan"), 0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0] * 300).to(dtype)
    keys = sorted(int(k) & ((1 << width) - 1) for k in reference.order_keys(gauss[:2000]))
    one = int(reference.order_keys(torch.tensor([1.0], dtype=dtype))[0]) & ((1 << width) - 1)
    brackets = {  # (lo, hi) keys: a middle bracket, the whole range, lo == hi on a value present
        "middle": (keys[900], keys[1100]),
        "everything": (0, (1 << width) - 1),
        "one value": (one, one),
    }
    lines, want = [], []
    for x in (gauss, special):
        ordered = [int(k) & ((1 << width) - 1) for k in reference.order_keys(x[~torch.isnan(x)])]
        nan = int(torch.isnan(x).sum())
        for lo, hi in brackets.values():
            counted = [
                nan,
                sum(k < lo for k in ordered),
                sum(k == lo for k in ordered),
                sum(k == hi != lo for k in ordered),
                sum(lo < k < hi for k in ordered),
            ]
            for misalign in range(per_vector):
                lines.append(f"pass {width} {mantissa} {misalign} {lo:x} {hi:x} {x.numel()} " + " ".join(hex_bits(x)))
                want.append(counted)
        lo, hi = brackets["everything"]
        for misalign in range(per_vector):
            for n in (1, per_vector + 1, 1_003):  # odd sizes: heads, tails, a partial round
                nan = int(torch.isnan(x[:n]).sum())
                lines.append(f"pass {width} {mantissa} {misalign} {lo:x} {hi:x} {n} " + " ".join(hex_bits(x[:n])))
                want.append([nan, 0, 0, 0, n - nan])
    answers = header(lines)
    for counted, answer in zip(want, answers):
        fields = answer.split()
        assert list(map(int, fields[:5])) == counted, answer
        most, slots = int(fields[5]), int(fields[6])
        assert most <= slots and fields[7] == "ok", answer
    # every score of a full chunk a candidate: the stage fills to its bound (scalars + the flush window)
    assert max(int(a.split()[5]) for a in answers) > sc.COMPACT_STAGE_ELEMENTS - per_vector * 256


@pytest.mark.cuda
def test_cuda_op_equals_the_reference_under_both_schedules(monkeypatch):
    """The kernels under PYPRUNE_FAST_SELECT_PATH=compact and =full: every adversarial case above (the
    planted misses and the overflow fall back on the device), bit for bit."""
    native_or_skip("cuda")
    for dtype, name, xs, k, _ in all_cases():
        want_value, want_counts, want_nan = reference.kth_smallest_counts(xs, k)
        for schedule in ("compact", "full"):
            monkeypatch.setenv("PYPRUNE_FAST_SELECT_PATH", schedule)
            value, counts, nan = torch.ops.pyprune_fast.kth_smallest_counts([x.cuda() for x in xs], k)
            assert bits(value.cpu()) == bits(want_value), (dtype, name, k, schedule)
            assert counts.tolist() == want_counts.tolist(), (dtype, name, k, schedule)
            assert nan.tolist() == want_nan.tolist(), (dtype, name, k, schedule)
