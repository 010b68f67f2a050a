"""The CUDA k-th smallest selection with candidate compaction, emulated on the CPU step for step as
csrc/cuda/select.cu runs it (the plan, the hash, the bracket and the decision are those of
csrc/include/pyprune_fast/select_compact.h; keep the three in step):

1. sample: m = min(COMPACT_SAMPLE, n) keys, one per stratum [i n / m, (i + 1) n / m) of the flat positions
   (tensors in order, each in memory order), at a fixed hash of i inside it; sorted (cub's radix sort);
2. bracket: lo = sorted[r_lo], hi = sorted[r_hi] around the k-th key's expected sample rank k m / n,
   widened by COMPACT_SIGMAS standard deviations plus COMPACT_SLACK ranks (no bound past either end);
3. one full pass: NaN per tensor; keys below lo, equal to lo, equal to hi; the candidates lo < key < hi
   written to a buffer of `capacity` entries (all counted, written while they fit);
4. decide: NaN -> refused; the k-th key is lo or hi -> done; inside with every candidate written -> the
   radix passes over the candidates; the bracket missed or the buffer overflowed -> the full passes;
5. radix select with 11-bit digits (select_bin's first bin whose cumulative count reaches the rank) over
   the candidates, or over everything (the schedule without compaction).

`kth_smallest_counts` returns what the kernels return (value, counts, NaN per tensor: the contract of
reference.kth_smallest_counts, bit for bit) and a trace: the path taken and the elements read and written,
in passes over the n scores, so that tests can hold the schedule to its cost (<= 1.3 passes on average
for fp32 where the kernels' full passes take 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .select import order_keys, radix_width

COMPACT_SAMPLE = 1 << 14
COMPACT_SIGMAS = 5.0
COMPACT_SLACK = 8
COMPACT_MIN_ELEMENTS = 1 << 24
COMPACT_STAGE_ELEMENTS = 1 << 12
DIGIT_BITS = 11  # the CUDA passes' digit (kDigitGpu)
_INT_OF_WIDTH = {16: torch.int16, 32: torch.int32, 64: torch.int64}


@dataclass(frozen=True)
class CompactPlan:
    """compact_plan of select_compact.h: sample size, sorted-sample indices of lo and hi, buffer entries."""

    m: int
    r_lo: int
    r_hi: int
    capacity: int


@dataclass
class Trace:
    """How a selection ran: path ("full": no compaction; "lo"/"hi": the k-th key is a bracket key;
    "candidates"; "nan"; fallbacks "miss-low", "miss-high", "overflow"), candidates counted, and the
    elements read or written, as passes over the n scores."""

    path: str
    candidates: int
    passes: float


def compact_plan(n: int, k: int) -> CompactPlan:
    """The plan for n >= 1 keys and 1 <= k <= n (the header's arithmetic, in the same float order)."""
    m = min(n, COMPACT_SAMPLE)
    c = k * m // n
    p = float(k) / float(n)
    sigma = math.sqrt(float(m) * p * (1.0 - p))
    margin = math.ceil(COMPACT_SIGMAS * sigma) + COMPACT_SLACK
    r_lo, r_hi = c - 1 - margin, c - 1 + margin
    width = min(r_hi, m - 1) - max(r_lo, 0) + 1
    capacity = -(-n // m) * width * 5 // 4 + COMPACT_STAGE_ELEMENTS
    return CompactPlan(m, r_lo, r_hi, min(capacity, n))


def sample_hash(i: int) -> int:
    """lowbias32 of i (uint32 arithmetic)."""
    i ^= i >> 16
    i = (i * 0x7FEB352D) & 0xFFFFFFFF
    i ^= i >> 15
    i = (i * 0x846CA68B) & 0xFFFFFFFF
    return i ^ (i >> 16)


def sample_positions(n: int, m: int) -> list[int]:
    """The flat positions of the m samples of n (m <= n): one per stratum, at sample_hash inside it."""
    positions = []
    for i in range(m):
        begin = i * n // m
        positions.append(begin + sample_hash(i) % ((i + 1) * n // m - begin))
    return positions


def _unsigned_keys(flat: Tensor) -> Tensor:
    """Order keys whose signed int64 order is the unsigned key order (64-bit keys get their top bit
    flipped; narrower keys are non-negative already)."""
    keys = order_keys(flat)
    return keys ^ torch.iinfo(torch.int64).min if radix_width(flat.dtype) == 64 else keys


def _to_unsigned(key: int, width: int) -> int:
    return key + (1 << 63) if width == 64 else key


def _to_signed(key: int, width: int) -> int:
    return key - (1 << 63) if width == 64 else key


def _radix_select(keys: Tensor, rank: int, width: int) -> tuple[int, int, int]:
    """The 11-bit radix passes over keys (_unsigned_keys, no NaN): (k-th key, keys below it, keys
    equal to it among `keys`), bin by bin as select_bin_kernel picks them."""
    passes = -(-width // DIGIT_BITS)
    unsigned = keys if width < 64 else keys ^ torch.iinfo(torch.int64).min  # back to the key's bit pattern
    prefix, less, equal = 0, 0, 0
    for p in range(passes):
        shift = max(width - (p + 1) * DIGIT_BITS, 0)
        bits = width - p * DIGIT_BITS - shift
        high = width - p * DIGIT_BITS  # the prefix's bits lie above this
        if high < width:
            as_int64 = prefix - (1 << 64) if prefix >> 63 else prefix  # the prefix as the int64 of its bits
            unsigned = unsigned[(unsigned >> high) == (as_int64 >> high)]
        digits = (unsigned >> shift) & ((1 << bits) - 1)
        hist = torch.bincount(digits, minlength=1 << bits)
        cum = torch.cumsum(hist, 0)
        reached = torch.nonzero(cum >= rank)
        b = int(reached[0]) if reached.numel() else (1 << bits) - 1
        below = int(cum[b] - hist[b])
        less, rank = less + below, rank - below
        prefix |= b << shift
        equal = int(hist[b])
    return prefix, less, equal


def _result(prefix: int, less: int, equal: int, nan: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """finish_kernel: the value's bits from the key (selection_bits: +0.0 when refused), the counts."""
    width = radix_width(dtype)
    sign = 1 << (width - 1)
    if int(nan.sum()) > 0:
        bits, less, equal = 0, 0, 0
    else:
        bits = prefix & ~sign if prefix & sign else ~prefix & ((1 << width) - 1)
    signed = bits - (1 << width) if bits & sign else bits
    value = torch.tensor([signed], dtype=_INT_OF_WIDTH[width]).view(dtype)[0]
    return value, torch.tensor([less, equal], dtype=torch.long), nan


def decide(k: int, lo: int, hi: int, counted: tuple[int, int, int, int], capacity: int, nan: int) -> str:
    """compact_decide's branches: the path after the full pass (counted = below, eq_lo, eq_hi, candidates)."""
    below, eq_lo, eq_hi, cand = counted
    if nan > 0:
        return "nan"
    if k <= below:
        return "miss-low"
    if k <= below + eq_lo:
        return "lo"
    if lo == hi:
        return "miss-high"
    if k <= below + eq_lo + cand:
        return "candidates" if cand <= capacity else "overflow"
    if k <= below + eq_lo + cand + eq_hi:
        return "hi"
    return "miss-high"


def kth_smallest_counts(
    xs: Sequence[Tensor], k: int, schedule: str = "compact"
) -> tuple[Tensor, Tensor, Tensor, Trace]:
    """kth_smallest_counts as the CUDA kernels compute it: schedule "compact" (PYPRUNE_FAST_SELECT_PATH=
    compact), "full" (=full: the radix passes over everything) or "auto" (compact from
    COMPACT_MIN_ELEMENTS scores on). Returns value, counts, NaN per tensor, and the Trace."""
    if schedule not in ("auto", "full", "compact"):
        raise ValueError(f"schedule must be 'auto', 'full' or 'compact', got {schedule!r}")
    dtype = xs[0].dtype
    width = radix_width(dtype)
    flat = torch.cat([x.detach().reshape(-1) for x in xs])
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of elements), got {k}")
    passes = -(-width // DIGIT_BITS)
    is_nan = torch.isnan(flat)
    nan = torch.stack([torch.isnan(x).sum() for x in xs]).long()
    keys = _unsigned_keys(flat)
    if schedule == "full" or (schedule == "auto" and n < COMPACT_MIN_ELEMENTS):
        reads = n if int(nan.sum()) else passes * n  # a selection with NaN stops after pass 0
        prefix, less, equal = (0, 0, 0) if int(nan.sum()) else _radix_select(keys, k, width)
        return (*_result(prefix, less, equal, nan, dtype), Trace("full", 0, reads / n))

    plan = compact_plan(n, k)
    sample = torch.sort(keys[torch.tensor(sample_positions(n, plan.m), device=keys.device)]).values
    lo = _to_unsigned(int(sample[plan.r_lo]), width) if plan.r_lo >= 0 else 0
    hi = _to_unsigned(int(sample[plan.r_hi]), width) if plan.r_hi < plan.m else (1 << width) - 1
    lo_s, hi_s = _to_signed(lo, width), _to_signed(hi, width)
    ordered = keys[~is_nan]
    below = int((ordered < lo_s).sum())
    eq_lo = int((ordered == lo_s).sum())
    eq_hi = int((ordered == hi_s).sum()) if hi != lo else 0
    inside = (ordered > lo_s) & (ordered < hi_s)
    candidates = ordered[inside]  # in any order: the selection does not depend on it
    cand = candidates.numel()
    path = decide(k, lo, hi, (below, eq_lo, eq_hi, cand), plan.capacity, int(nan.sum()))
    reads = plan.m + n + min(cand, plan.capacity)  # sample, the full pass, the candidates written
    if path == "candidates":
        prefix, less, equal = _radix_select(candidates, k - below - eq_lo, width)
        less += below + eq_lo
        reads += passes * cand
    elif path == "lo":
        prefix, less, equal = lo, below, eq_lo
    elif path == "hi":
        prefix, less, equal = hi, below + eq_lo + cand, eq_hi
    elif path == "nan":
        prefix, less, equal = 0, 0, 0
    else:  # a fallback: the full passes, from the initial state
        prefix, less, equal = _radix_select(keys, k, width)
        reads += passes * n
    return (*_result(prefix, less, equal, nan, dtype), Trace(path, cand, reads / n))
