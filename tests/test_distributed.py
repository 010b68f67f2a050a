"""pyprune_fast.distributed: global masks and k-th values over scores split across gloo ranks, bit for
bit those of one process given every rank's scores in rank order; data-parallel criteria equal to
one process over all batches; a failing rank makes every rank raise, never hang.

Each world (2-4 local processes, gloo, a 30 s process-group timeout) runs every case of a list in one
spawn and saves what each rank got; the tests compare with one process computing the same cases."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pyprune_fast import distributed, masks, ops
from tests.worlds import run_world

# --- the cases: every rank's share of the scores, built identically in the workers and the test -------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scores_of(case: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's score dict for a case (names unique over ranks so that the dicts can be merged)."""
    g = _gen(1000 * world + 17 * rank + len(case))
    if case == "random":
        return {f"r{rank}.a": torch.randn(37, 11, generator=g), f"r{rank}.b": torch.randn(500, generator=g)}
    if case == "ties":  # few distinct values: the threshold value is spread over every rank
        return {
            f"r{rank}.a": torch.randint(0, 4, (300,), generator=g).float(),
            f"r{rank}.b": torch.randint(0, 4, (17, 5), generator=g).float(),
        }
    if case == "special":
        base = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0, 0.0, -0.0])
        return {f"r{rank}.s": base.repeat(rank + 1), f"r{rank}.t": torch.randn(9, generator=g).sign() * 0.0}
    if case in ("float16", "bfloat16", "float64"):
        dtype = getattr(torch, case)
        return {
            f"r{rank}.a": torch.randn(123, generator=g).to(dtype),
            f"r{rank}.b": torch.randint(-3, 3, (64,), generator=g).to(dtype),
        }
    if case == "mixed":  # fp16 on even ranks, fp32 on odd ones: promoted over all ranks
        dtype = torch.float16 if rank % 2 == 0 else torch.float32
        return {f"r{rank}.a": torch.randn(200, generator=g).to(dtype)}
    if case == "empty":  # an empty tensor on rank 0, no tensor at all on the last rank
        if rank == world - 1:
            return {}
        extra = {f"r{rank}.e": torch.empty(0, 3)} if rank == 0 else {}
        return {**extra, f"r{rank}.a": torch.randint(0, 3, (50,), generator=g).float()}
    raise ValueError(case)


MASK_CASES = [
    ("random", 0.5),
    ("random", 0.0),
    ("random", 1.0),
    ("ties", 0.37),
    ("ties", 0.8),
    ("special", 0.45),
    ("float16", 0.6),
    ("bfloat16", 0.3),
    ("float64", 0.55),
    ("mixed", 0.5),
    ("empty", 0.5),
]


def merged(case: str, world: int) -> dict[str, torch.Tensor]:
    """Every rank's scores in rank order, then dict order: the one-process equivalent."""
    out: dict[str, torch.Tensor] = {}
    for r in range(world):
        out.update(scores_of(case, r, world))
    return out


def _masks_job(rank: int, world: int):
    for case, sparsity in MASK_CASES:
        scores = scores_of(case, rank, world)
        yield (
            f"masks/{case}/{sparsity}",
            lambda s=scores, sp=sparsity: masks.global_unstructured(s, sp, group=dist.group.WORLD),
        )

        def applied(s=scores, sp=sparsity):
            params = {n: torch.ones_like(t, dtype=torch.float32) for n, t in s.items()}
            assert masks.global_unstructured(s, sp, apply_to=params, group=dist.group.WORLD) is None
            return params

        yield f"apply/{case}/{sparsity}", applied
    for case in ("random", "ties", "float64", "empty"):
        total = sum(t.numel() for t in merged(case, world).values())
        for k in (1, total // 3, total):
            scores = list(scores_of(case, rank, world).values())
            yield f"kth/{case}/{k}", lambda s=scores, k=k: ops.kth_smallest(s, k, group=dist.group.WORLD)
    channel = {f"r{rank}.conv": torch.randn(8 + rank, generator=_gen(rank))}
    yield "channels", lambda: masks.channels(channel, 0.5, group=dist.group.WORLD)


def _failures_job(rank: int, world: int):
    good = scores_of("random", rank, world)
    with_nan = {n: t.clone() for n, t in good.items()}
    if rank == 1:
        with_nan[f"r{rank}.b"][3] = float("nan")
    yield "nan_on_rank_1", lambda: masks.global_unstructured(with_nan, 0.5, group=dist.group.WORLD)
    yield "nan_on_rank_1_k0", lambda: masks.global_unstructured(with_nan, 0.0, group=dist.group.WORLD)
    bad = 1.5 if rank == 0 else 0.5  # a bad argument on rank 0 only: raised before any collective
    yield "bad_sparsity_on_rank_0", lambda: masks.global_unstructured(good, bad, group=dist.group.WORLD)
    differing = 0.25 if rank == 0 else 0.5
    yield "sparsity_differs", lambda: masks.global_unstructured(good, differing, group=dist.group.WORLD)
    typed = {"x": "not a tensor"} if rank == world - 1 else good
    yield "bad_type_on_last_rank", lambda: masks.global_unstructured(typed, 0.5, group=dist.group.WORLD)
    yield "kth_k_differs", lambda: ops.kth_smallest(list(good.values()), 5 + rank, group=dist.group.WORLD)
    yield "still_works_after", lambda: masks.global_unstructured(good, 0.5, group=dist.group.WORLD)


# --- data-parallel criteria -------------------------------------------------------------------------

# grasp divides the outputs by its temperature (200, not a power of 2): checked on random data only
EXACT_CRITERIA = [
    "snip",
    "obd",
    "feature_l1",
    "wanda",
    "taylor",
    "fisher",
    "ide",
    "ide_trace",
    "apoz",
    "hrank",
]


def dyadic_model() -> torch.nn.Module:
    """Weights in {-1, -1/2, 0, 1/2, 1} and integer inputs: every sum over batches is exact in float32,
    so the order of the additions cannot change a bit."""
    g = _gen(7)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 25, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randint(-2, 3, p.shape, generator=g) / 2.0).float())
    return model


def batches(exact: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = _gen(11)
    out = []
    for _ in range(4):
        x = torch.randint(-2, 3, (3, 2, 5, 5), generator=g).float() if exact else torch.randn(3, 2, 5, 5, generator=g)
        out.append((x, torch.randint(-2, 3, (3, 3), generator=g).float()))
    return out


def squared_error(outputs, targets):
    return ((outputs - targets) ** 2).sum()


def _criteria_job(rank: int, world: int):
    from pyprune_fast import score

    for exact in (True, False):
        data = batches(exact)[rank::world]
        names = EXACT_CRITERIA + ([] if exact else ["grasp", "refer", "afr"])
        for name in names:
            yield (
                f"{name}/{exact}",
                lambda n=name, d=data: score(dyadic_model(), n, d, loss_fn=squared_error, group=dist.group.WORLD),
            )
    bad = batches(True)[rank::world] if rank else []  # rank 0 has no batches: every rank raises
    yield (
        "no_batches_on_rank_0",
        lambda: score(dyadic_model(), "snip", bad, loss_fn=squared_error, group=dist.group.WORLD),
    )


JOBS = {"masks": _masks_job, "failures": _failures_job, "criteria": _criteria_job}


# --- selection tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def mask_world(request, tmp_path_factory):
    world = request.param
    return world, run_world(__name__, "masks", world, tmp_path_factory.mktemp("dist"))


def _ok(result):
    assert result[0] == "ok", result
    return result[1]


def test_masks_bit_identical_to_one_process(mask_world):
    world, results = mask_world
    for case, sparsity in MASK_CASES:
        want = masks.global_unstructured(merged(case, world), sparsity)
        got: dict[str, torch.Tensor] = {}
        for r in range(world):
            part = _ok(results[r][f"masks/{case}/{sparsity}"])
            assert list(part) == list(scores_of(case, r, world)), (case, r)
            got.update(part)
        assert list(got) == list(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (case, sparsity, name)
        pruned = sum(int((~m).sum()) for m in got.values())
        assert pruned == round(sparsity * sum(m.numel() for m in want.values()))


def test_apply_to_with_group_zeros_what_the_masks_prune(mask_world):
    world, results = mask_world
    for case, sparsity in MASK_CASES:
        want = masks.global_unstructured(merged(case, world), sparsity)
        for r in range(world):
            for name, p in _ok(results[r][f"apply/{case}/{sparsity}"]).items():
                assert torch.equal(p != 0, want[name]), (case, name)


def test_kth_smallest_with_group_equals_one_process(mask_world):
    world, results = mask_world
    for case in ("random", "ties", "float64", "empty"):
        everything = list(merged(case, world).values())
        total = sum(t.numel() for t in everything)
        for k in (1, total // 3, total):
            want = ops.kth_smallest(everything, k)
            for r in range(world):
                got = _ok(results[r][f"kth/{case}/{k}"])
                assert (
                    got.dtype == want.dtype
                    and got.view(-1).view(torch.uint8).tolist() == want.view(-1).view(torch.uint8).tolist()
                ), (case, k, r)


def test_channels_global_with_group(mask_world):
    world, results = mask_world
    everything = {f"r{r}.conv": torch.randn(8 + r, generator=_gen(r)) for r in range(world)}
    want = masks.channels(everything, 0.5)
    for r in range(world):
        ((name, mask),) = _ok(results[r]["channels"]).items()
        assert torch.equal(mask, want[name])


@pytest.fixture(scope="module")
def failure_world(tmp_path_factory):
    return run_world(__name__, "failures", 3, tmp_path_factory.mktemp("dist"))


def test_nan_on_one_rank_raises_on_every_rank(failure_world):
    for case in ("nan_on_rank_1", "nan_on_rank_1_k0"):
        for r, res in enumerate(failure_world):
            status, kind, message = res[case]
            assert (status, kind) == ("error", "ValueError"), (case, r, res[case])
            assert "scores['r1.b'] on rank 1 (1 values)" in message and "NaN" in message


def test_a_rank_failing_before_a_collective_makes_every_rank_raise(failure_world):
    res = [r["bad_sparsity_on_rank_0"] for r in failure_world]
    assert res[0][:2] == ("error", "ValueError") and "sparsity must be in [0, 1], got 1.5" in res[0][2]
    for other in res[1:]:
        assert other[:2] == ("error", "RankFailed") and "rank 0: ValueError: sparsity must be in [0, 1]" in other[2]
    last = len(failure_world) - 1
    res = [r["bad_type_on_last_rank"] for r in failure_world]
    assert res[last][:2] == ("error", "TypeError")
    assert all(x[:2] == ("error", "RankFailed") and f"rank {last}: TypeError" in x[2] for x in res[:last])


def test_arguments_that_differ_between_ranks_are_refused_everywhere(failure_world):
    for case, text in (
        ("sparsity_differs", "sparsity must be the same on every rank"),
        ("kth_k_differs", "k must be the same"),
    ):
        for res in failure_world:
            assert res[case][:2] == ("error", "ValueError") and text in res[case][2], res[case]


def test_the_group_is_usable_after_failures(failure_world):
    world = len(failure_world)
    want = masks.global_unstructured(merged("random", world), 0.5)
    for res in failure_world:
        for name, m in _ok(res["still_works_after"]).items():
            assert torch.equal(m, want[name])


def test_group_checks():
    with pytest.raises(ValueError, match="group= needs an initialized torch.distributed"):
        masks.global_unstructured({"a": torch.ones(3)}, 0.5, group=object())
    with pytest.raises(ValueError, match="group= needs an initialized torch.distributed"):
        ops.kth_smallest([torch.ones(3)], 1, group=object())
    with pytest.raises(ValueError, match="scope='global'"):
        masks.channels({"a": torch.ones(3)}, 0.5, scope="layer", group=object())
    assert distributed.check_group(None) is None


@pytest.fixture(scope="module")
def criteria_world(tmp_path_factory):
    return run_world(__name__, "criteria", 2, tmp_path_factory.mktemp("dist"))


def test_data_parallel_scores_bit_identical_when_sums_are_exact(criteria_world):
    from pyprune_fast import score

    for name in EXACT_CRITERIA:
        want = score(dyadic_model(), name, batches(True), loss_fn=squared_error)
        for res in criteria_world:
            got = _ok(res[f"{name}/True"])
            assert list(got) == list(want), name
            for key in want:
                assert torch.equal(got[key], want[key]), (name, key)


def test_data_parallel_scores_close_on_random_data(criteria_world):
    """Random inputs: the ranks' partial sums are added in another order than batch after batch; the
    difference is a float32 reassociation of a 4-term sum, a few ulps of the largest score."""
    from pyprune_fast import score

    for name in EXACT_CRITERIA + ["grasp", "refer", "afr"]:
        want = score(dyadic_model(), name, batches(False), loss_fn=squared_error)
        for res in criteria_world:
            got = _ok(res[f"{name}/False"])
            for key in want:
                scale = want[key].abs().max().item() or 1.0
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5 * scale, msg=f"{name} {key}")


def test_a_rank_without_batches_makes_every_rank_raise(criteria_world):
    res = [r["no_batches_on_rank_0"] for r in criteria_world]
    assert res[0][:2] == ("error", "ValueError") and "data yielded no batches" in res[0][2]
    assert res[1][:2] == ("error", "RankFailed") and "rank 0: ValueError: data yielded no batches" in res[1][2]


def test_a_criterion_that_does_not_reduce_is_refused_with_group():
    """Checked without a world: a registered criterion that reads data but never calls job.reduce."""
    from pyprune_fast.criteria import registry

    class Comm:  # stands in for a Communicator: only what the check reads
        size = 2

    def local_only(job):
        return [p.detach().abs() for p in job.tensors]

    local_only.needs = frozenset({"data"})
    job = type("J", (), {"comm": Comm(), "reduced": False})()
    with pytest.raises(ValueError, match="does not reduce its batch statistics"):
        registry._check_reduced(local_only, job)
