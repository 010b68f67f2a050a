"""Selection and calibration across processes (torch.distributed): each rank holds part of the scores
(layers split over ranks) or part of the calibration batches (data parallel).

Selection. The exact k-th smallest score over all ranks is a radix select whose 16-bit digit
histograms (`ops.radix_histogram`, int64 [65536] = 512 KiB a pass) are summed over the ranks: the
scores themselves are never sent. fp16/bf16 take one pass, fp32 two, fp64 four. Then each rank learns
how many elements equal to the threshold the lower ranks hold (one int per rank) and builds its own
masks: the global tie order is rank order, then each rank's dict order, each tensor row-major. The
result is bit for bit what one process gets from the concatenation of every rank's scores in rank
order (`masks.global_unstructured`, `ops.kth_smallest` with `group=`).

Calibration. With `group=`, criteria sum their per-batch quantities (gradient sums, activation
norms, channel statistics, batch counts) over the ranks before forming the scores, so N ranks each
holding 1/N of the batches get the scores one process gets from all batches: equal up to the order in
which floating-point partial sums are added (the ranks' partial sums are added together instead of
batch after batch), hence bit for bit whenever those sums are exact (e.g. small integers, dyadic
values), and otherwise within the rounding of a reassociated sum.

Failures. Every collective is preceded by a status exchange (one int64 all_reduce), and a rank that
raises inside a `Communicator.session()` reports its error there: every rank then raises (its own
error, or `RankFailed` naming the failed ranks and their errors) instead of waiting for a collective
that never comes. Set a timeout on the process group (`init_process_group(..., timeout=...)`) for
failures outside these functions (a rank that dies or never calls).

`group`: None (no communication, one process), or a torch.distributed ProcessGroup such as
`torch.distributed.group.WORLD`; gloo (CPU tensors) or nccl (CUDA tensors).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, reference
from .ops.checks import SCORE_TYPES, as_list, check_dtypes, check_int, check_same_device

__all__ = [
    "Communicator",
    "RankFailed",
    "Selection",
    "check_group",
    "global_threshold",
    "kth_smallest",
    "select",
    "session",
]

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_BUCKET = 1 << 24  # elements per all_reduce of all_reduce_sum_


class RankFailed(RuntimeError):
    """Raised on the ranks whose peers failed inside a distributed computation; `failures` maps each
    failed rank to its error message."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = failures
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        super().__init__(f"{len(failures)} rank(s) failed: {detail}")


def check_group(group: object) -> object:
    """`group` checked: None, or a ProcessGroup of an initialized torch.distributed that this process
    belongs to (ValueError/TypeError naming `group` otherwise).

    Args:
        group: the value given as group=.

    Returns:
        `group`.
    """
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group= needs an initialized torch.distributed (call torch.distributed.init_process_group first), "
            f"got group={group!r}"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be None or a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD), "
            f"got {type(group).__name__}"
        )
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return group


class Communicator:
    """The collectives of one distributed computation on `group`, each preceded by a status exchange
    (see the module docstring), with a tally of what this rank sent: `payload_bytes` (the buffers it
    handed to collectives) and `wire_bytes` (what a ring algorithm sends from each rank: all_reduce
    2(N-1)/N of the buffer, all_gather (N-1) times this rank's part)."""

    def __init__(self, group: object) -> None:
        self.group = check_group(group)
        if self.group is None:
            raise ValueError("group must be a ProcessGroup for a Communicator, got None")
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        backend = str(dist.get_backend(self.group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self.payload_bytes = 0
        self.wire_bytes = 0
        self._broken = False

    def _run(self, fn, *args) -> None:
        try:
            fn(*args, group=self.group)
        except Exception:
            self._broken = True  # a collective itself failed (timeout, peer gone): no more exchanges
            raise

    def _reduce(self, t: Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.payload_bytes += nbytes
        self.wire_bytes += 2 * (self.size - 1) * nbytes // self.size
        self._run(dist.all_reduce, t)

    def agree(self, error: BaseException | None = None) -> None:
        """The status exchange: returns when no rank reports an error; else every rank raises, this
        one `error` when it has one, the others RankFailed."""
        status = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=self.device)
        self._reduce(status)
        if int(status) == 0:
            return
        messages: list[object] = [None] * self.size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        self._run(dist.all_gather_object, messages, mine)
        if error is not None:
            raise error
        raise RankFailed({r: m for r, m in enumerate(messages) if m is not None})

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Σ over ranks of `t` (a new tensor on t's device)."""
        self.agree()
        buf = t.detach().to(self.device, copy=True)
        self._reduce(buf)
        return buf.to(t.device)

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Σ over ranks of each tensor, in place (one status exchange; tensors of one dtype packed
        into all_reduce buffers of up to 2^24 elements). Returns the tensors."""
        tensors = list(tensors)
        self.agree()
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            bucket: list[Tensor] = []
            for t in [*group, None]:
                full = sum(b.numel() for b in bucket) + (0 if t is None else t.numel()) > _BUCKET
                if bucket and (t is None or full):
                    flat = torch.cat([b.detach().reshape(-1).to(self.device) for b in bucket])
                    self._reduce(flat)
                    for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                        with torch.no_grad():
                            b.copy_(part.view(b.shape))
                    bucket = []
                if t is not None:
                    bucket.append(t)
        return tensors

    def broadcast_(self, tensors: Sequence[Tensor], src: int) -> list[Tensor]:
        """Every rank's `tensors` overwritten, in place, by rank `src`'s (a rank of this group); one
        status exchange, then one broadcast per tensor. Returns the tensors."""
        tensors = list(tensors)
        self.agree()
        root = dist.get_global_rank(self.group, src)
        for t in tensors:
            direct = t.device == self.device and t.is_contiguous()
            buf = t.detach() if direct else t.detach().to(self.device).contiguous()
            nbytes = buf.numel() * buf.element_size()
            if self.rank == src:
                self.payload_bytes += nbytes
                self.wire_bytes += nbytes
            self._run(dist.broadcast, buf, root)
            if not direct:
                with torch.no_grad():
                    t.copy_(buf)
        return tensors

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's list of ints (the same length on every rank), in rank order."""
        self.agree()
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        nbytes = mine.numel() * mine.element_size()
        self.payload_bytes += nbytes
        self.wire_bytes += (self.size - 1) * nbytes
        self._run(dist.all_gather, parts, mine)
        return [p.tolist() for p in parts]

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's picklable object, in rank order (for error messages; not tallied)."""
        self.agree()
        out: list[object] = [None] * self.size
        self._run(dist.all_gather_object, out, obj)
        return out

    @contextlib.contextmanager
    def session(self) -> Iterator[Communicator]:
        """The scope of one distributed computation: an error raised inside it on any rank is reported
        at that rank's next status exchange and makes every rank raise; a last exchange on the way out
        catches errors raised after the last collective."""
        try:
            yield self
        except RankFailed:
            raise
        except Exception as error:
            if not self._broken:
                self.agree(error)
            raise
        self.agree()


def session(comm: Communicator | None) -> contextlib.AbstractContextManager:
    """`comm.session()`, or a context that does nothing when there is no communicator (group=None).

    Args:
        comm: the communicator, or None.

    Returns:
        The context manager.
    """
    return contextlib.nullcontext() if comm is None else comm.session()


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _value_of_key(key: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The float whose order key (reference.order_keys) is `key`, as a 0-d tensor."""
    width = reference.radix_width(dtype)
    sign, mask = 1 << (width - 1), (1 << width) - 1
    bits = key & ~sign & mask if key & sign else ~key & mask
    if bits >= sign:
        bits -= 1 << width
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    return torch.tensor(bits, dtype=ints).view(dtype).to(device)


class Selection:
    """The k-th smallest value over all ranks and the counts around it: `value` (0-d, the global dtype),
    `less`/`equal` over all ranks, `local_less`/`local_equal` on this rank, `key` (its order key)."""

    def __init__(self, key: int, value: Tensor, less: int, equal: int, local_less: int, local_equal: int) -> None:
        self.key, self.value = key, value
        self.less, self.equal = less, equal
        self.local_less, self.local_equal = local_less, local_equal


def _raise_nan(comm: Communicator, nan: Tensor | None, labels: Sequence[str]) -> None:
    """ValueError on every rank naming the tensors (and ranks) holding NaN."""
    mine = [] if nan is None else [(labels[i], int(n)) for i, n in enumerate(nan.tolist()) if n]
    found = [(r, label, n) for r, part in enumerate(comm.all_gather_object(mine)) for label, n in part]
    detail = ", ".join(f"{label} on rank {r} ({n} values)" for r, label, n in found)
    raise ValueError(f"NaN in the scores: {detail}; scores must not be NaN")


def select(
    comm: Communicator, tensors: Sequence[Tensor], dtype: torch.dtype, k: int, labels: Sequence[str]
) -> Selection:
    """Building block (arguments not checked): the k-th smallest (1 <= k <= global total) over this
    rank's `tensors` (all of `dtype`, possibly none) and the other ranks' by summed radix histograms;
    NaN on any rank raises ValueError on every rank.

    Args:
        comm: the ranks' communicator.
        tensors: this rank's tensors.
        dtype: the dtype every rank's tensors have.
        k: the rank (1-based) of the value over all ranks' elements.
        labels: how errors name the tensors.

    Returns:
        The Selection: the value and the per-tensor counts below it.
    """
    width = reference.radix_width(dtype)
    local = [t for t in tensors if t.numel()]
    device = tensors[0].device if tensors else torch.device("cpu")
    prefix, rank, less, local_less = 0, k, 0, 0
    equal = local_equal = 0
    for digit in range(width // reference.RADIX_DIGIT_BITS):
        if local:
            hist, nan = ops.radix_histogram(local, digit, prefix)
            hist = hist.cpu()
        else:
            hist, nan = torch.zeros(reference.RADIX_BINS, dtype=torch.int64), None
        if digit == 0:  # the NaN total rides along with the first histogram
            total_nan = torch.zeros(1, dtype=torch.int64) if nan is None else nan.sum().reshape(1).cpu()
            summed = comm.all_reduce_sum(torch.cat([hist, total_nan]))
            if int(summed[-1]):
                full_nan = None
                if tensors:
                    full_nan = torch.stack([torch.isnan(t).sum() for t in tensors]).cpu()
                _raise_nan(comm, full_nan, labels)
            summed = summed[:-1]
        else:
            summed = comm.all_reduce_sum(hist)
        cum = summed.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor([rank]))[0])
        below = int(cum[b - 1]) if b else 0
        less += below
        local_less += int(hist[:b].sum())
        rank -= below
        prefix |= b << (width - (digit + 1) * reference.RADIX_DIGIT_BITS)
        equal, local_equal = int(summed[b]), int(hist[b])
    return Selection(prefix, _value_of_key(prefix, dtype, device), less, equal, local_less, local_equal)


def _agreed_dtype(comm: Communicator, tensors: Sequence[Tensor], extra: Sequence[int]) -> tuple[torch.dtype, int, list]:
    """(global dtype, global element count, every rank's extra ints) from one small all_gather."""
    code = _DTYPE_CODES[tensors[0].dtype] if tensors else -1
    rows = comm.all_gather_ints([sum(t.numel() for t in tensors), code, *extra])
    codes = [r[1] for r in rows if r[1] >= 0]
    dtype = _CODE_DTYPES[codes[0]] if codes else torch.float32
    for c in codes[1:]:
        dtype = torch.promote_types(dtype, _CODE_DTYPES[c])
    return dtype, sum(r[0] for r in rows), [r[2:] for r in rows]


def kth_smallest(tensors: Sequence[Tensor], k: int, *, group: object) -> Tensor:
    """The exact k-th smallest value (1-based) over the elements of every rank's `tensors`, returned
    on every rank (0-d; the dtype all ranks' tensors promote to; on this rank's tensors' device, CPU
    for a rank without tensors). `k` must be the same on every rank; a rank may pass no tensors.
    Radix histograms are summed over the ranks, the scores never sent. NaN on any rank: ValueError
    on every rank naming the tensor and the rank.

    Args:
        tensors: this rank's tensors.
        k: the rank (1-based) of the value over all ranks' elements.
        group: the torch.distributed ProcessGroup.

    Returns:
        The value, a 0-d tensor.
    """
    comm = Communicator(group)
    with comm.session():
        tensors = as_list("tensors", tensors)
        check_dtypes("tensors", tensors, SCORE_TYPES)
        check_same_device({"tensors": tensors})
        k = check_int("k", k)
        dtype, total, extras = _agreed_dtype(comm, tensors, [k])
        if any(e[0] != k for e in extras):
            raise ValueError(f"k must be the same on every rank, got {[e[0] for e in extras]}")
        if not 1 <= k <= total:
            raise ValueError(f"k must be in [1, {total}] (the number of elements on all ranks), got {k}")
        labels = [f"tensors[{i}]" for i in range(len(tensors))]
        value = select(comm, [t.to(dtype) for t in tensors], dtype, k, labels).value
    return value


def global_threshold(
    comm: Communicator,
    tensors: Sequence[Tensor],
    sparsity: float,
    labels: Sequence[str],
    targets: Sequence[Tensor] | None = None,
) -> list[Tensor] | None:
    """Building block of `masks.global_unstructured(group=)` (arguments checked there, inside
    `comm.session()`): this rank's keep-masks with exactly round(sparsity × all ranks' elements)
    pruned over all ranks, lowest first, ties in rank order then tensor order then row-major; or, with
    `targets`, those entries zeroed in place (returns None). `sparsity` must be the same on every rank.

    Args:
        comm: the ranks' communicator.
        tensors: this rank's scores, of one dtype.
        sparsity: the fraction of all ranks' entries to prune.
        labels: how errors name the tensors.
        targets: tensors to prune in place instead of returning masks.

    Returns:
        This rank's bool keep-masks, or None with `targets`.
    """
    dtype, total, extras = _agreed_dtype(comm, tensors, [_float_bits(sparsity)])
    if any(e[0] != extras[0][0] for e in extras):
        raise ValueError("sparsity must be the same on every rank")
    tensors = [t if t.dtype == dtype else t.to(dtype) for t in tensors]
    k = round(float(sparsity) * total)
    if k == 0:
        nan = torch.stack([torch.isnan(t).sum() for t in tensors]).cpu() if tensors else None
        count = torch.zeros(1, dtype=torch.int64) if nan is None else nan.sum().reshape(1)
        if int(comm.all_reduce_sum(count)):
            _raise_nan(comm, nan, labels)
        return None if targets is not None else [torch.ones_like(t, dtype=torch.bool) for t in tensors]
    sel = select(comm, tensors, dtype, k, labels)
    lower_ties = sum(row[0] for row in comm.all_gather_ints([sel.local_equal])[: comm.rank])
    local_k = sel.local_less + min(max(k - sel.less - lower_ties, 0), sel.local_equal)
    if not tensors:
        return None if targets is not None else []
    if sum(t.numel() for t in tensors) == 0:
        return None if targets is not None else [torch.ones_like(t, dtype=torch.bool) for t in tensors]
    counts = torch.tensor([sel.local_less, sel.local_equal], dtype=torch.int64, device=tensors[0].device)
    if targets is not None:
        ops.threshold_apply_(targets, tensors, sel.value, counts, local_k)
        return None
    return ops.threshold_masks(tensors, sel.value, counts, local_k)
