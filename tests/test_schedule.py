"""Pruning schedules: masks kept through training (every optimizer, accumulation, torch.compile, DDP),
iterative rounds on their schedule to an exact sparsity, sensitivity that restores the model bit for
bit, the greedy allocation on its budget, and the CLI's --finetune, --schedule and sensitivity."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune_fast as ppf
from pyprune_fast import schedule
from pyprune_fast.app import cli
from tests import cli_factory, worlds

TINY = "tests.cli_factory:tiny"


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(count: int = 4, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(count)]


def half_masks(model: nn.Module) -> dict:
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if n.endswith("weight")}
    return ppf.masks.global_unstructured(scores, 0.5)


def zeros_of(model: nn.Module, masks: dict) -> dict:
    named = dict(model.named_parameters())
    return {n: named[n].detach()[~m] for n, m in masks.items()}


OPTIMIZERS = {
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.5),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("accumulate", [1, 3])
def test_pruned_weights_stay_exactly_zero_through_training(name, accumulate):
    model = mlp()
    optimizer = OPTIMIZERS[name](model.parameters())
    data = batches()
    # moments carried over from training before the masks must not move the pruned weights either
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    optimizer.step()
    optimizer.zero_grad()
    masks = half_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ppf.masks.keep(model, masks) as handle:
        assert handle.active
        for step in range(12):
            for micro in range(accumulate):
                x, y = data[(step + micro) % len(data)]
                (F.cross_entropy(model(x), y) / accumulate).backward()
            optimizer.step()
            optimizer.zero_grad()
            for n, z in zeros_of(model, masks).items():
                assert torch.equal(z, torch.zeros_like(z)), (n, step)
    assert not handle.active
    named = dict(model.named_parameters())
    for n, m in masks.items():  # the kept weights trained
        assert not torch.equal(named[n].detach()[m], before[n][m])


def test_masked_gradients_leave_adam_moments_of_pruned_entries_at_zero():
    model = mlp()
    masks = half_masks(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with ppf.masks.keep(model, masks):
        for x, y in batches():
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    named = dict(model.named_parameters())
    for n, m in masks.items():
        state = optimizer.state[named[n]]
        assert int(state["exp_avg"][~m].count_nonzero()) == 0
        assert int(state["exp_avg_sq"][~m].count_nonzero()) == 0
        assert int(state["exp_avg"][m].count_nonzero()) > 0


def test_nonfinite_gradients_of_pruned_entries_leave_weights_and_moments_at_plus_zero():
    model = mlp()
    masks = half_masks(model)
    named = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with ppf.masks.keep(model, masks):
        for i, (x, y) in enumerate(batches()):
            F.cross_entropy(model(x), y).backward()
            for n, m in masks.items():  # a multiplication by a 0/1 mask would turn these into NaN
                g = named[n].grad
                g[~m] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])[i]
            optimizer.step()
            optimizer.zero_grad()
    for n, m in masks.items():
        pruned = named[n].detach()[~m]
        assert torch.equal(pruned.view(torch.int32), torch.zeros_like(pruned, dtype=torch.int32)), n  # +0.0 bits
        assert int(optimizer.state[named[n]]["exp_avg_sq"][~m].count_nonzero()) == 0
        assert bool(named[n].detach()[m].isfinite().all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pruned_weights_stay_zero_in_every_float_width(dtype):
    model = mlp().to(dtype)
    masks = half_masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    with ppf.masks.keep(model, masks) as handle:
        assert handle.masks.keys() == masks.keys()
        for n, m in masks.items():
            assert torch.equal(handle.masks[n], m), n
        for x, y in batches():
            F.cross_entropy(model(x.to(dtype)), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    for n, z in zeros_of(model, masks).items():
        assert z.dtype == dtype and int(z.count_nonzero()) == 0, n


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_keep_names_a_parameter_it_cannot_mask():
    model = nn.Linear(4, 4).to(torch.complex128)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(TypeError, match=r"parameter 'weight' has dtype torch.complex128"):
        ppf.masks.keep(model, {"weight": mask})


def test_zeros_stay_zero_under_torch_compile():
    model = mlp()
    masks = half_masks(model)
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    with ppf.masks.keep(model, masks):
        for _ in range(3):
            for x, y in batches():
                F.cross_entropy(compiled(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
    for n, z in zeros_of(model, masks).items():
        assert int(z.count_nonzero()) == 0, n
    x = batches()[0][0]
    torch.testing.assert_close(compiled(x), model(x))


def test_removed_handle_leaves_a_plain_model():
    model = mlp()
    keys = list(model.state_dict())
    masks = half_masks(model)
    handle = ppf.masks.keep(model, masks)
    handle.remove()
    handle.remove()  # idempotent
    assert list(model.state_dict()) == keys
    assert all(type(p) is nn.Parameter for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert not hasattr(m, "parametrizations")
    for p in model.parameters():
        assert not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None)
    # nothing keeps the zeros any more: a step moves them
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches()[0]
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert any(int(z.count_nonzero()) > 0 for z in zeros_of(model, masks).values())


def test_keep_refuses_bad_masks():
    model = mlp()
    with pytest.raises(ValueError, match="masks name parameters the model does not have"):
        ppf.masks.keep(model, {"nope": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="must be a bool tensor"):
        ppf.masks.keep(model, {"0.weight": torch.ones(32, 8)})


def _ddp_job(rank: int, world: int):
    def run():
        from torch.nn.parallel import DistributedDataParallel

        model = mlp()
        masks = half_masks(model)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.1)
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
        with ppf.masks.keep(model, masks):
            for _ in range(5):
                for _ in range(2):  # gradient accumulation, the first micro-batch without all-reduce
                    x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
                    F.cross_entropy(ddp(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
        return {n: p.detach().clone() for n, p in model.named_parameters()}, masks

    return [("train", run)]


JOBS = {"ddp": _ddp_job}


def test_zeros_stay_zero_under_ddp(tmp_path):
    results = worlds.run_world("tests.test_schedule", "ddp", 2, tmp_path)
    (params0, masks), (params1, _) = results[0]["train"][1], results[1]["train"][1]
    for n, m in masks.items():
        assert int(params0[n][~m].count_nonzero()) == 0
        assert torch.equal(params0[n], params1[n])  # the ranks agree: the gradients were all-reduced
        assert int(params0[n][m].count_nonzero()) == int(m.sum())


@pytest.mark.parametrize("kind", ["exponential", "linear", "cubic"])
def test_round_sparsity_formulas(kind):
    s, rounds = 0.9, 5
    for r in range(1, rounds + 1):
        t = r / rounds
        expected = {"exponential": 1 - (1 - s) ** t, "linear": s * t, "cubic": s * (1 - (1 - t) ** 3)}[kind]
        assert schedule.round_sparsity(s, rounds, r, kind) == pytest.approx(expected, abs=1e-15)
    assert schedule.round_sparsity(s, rounds, rounds, kind) == s


@pytest.mark.parametrize("kind", ["exponential", "linear", "cubic"])
def test_iterative_rounds_follow_the_schedule_to_the_exact_sparsity(kind):
    model = mlp()
    data = batches()
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    seen = []
    report = schedule.iterative(
        model,
        "snip",
        data,
        sparsity=0.83,
        rounds=4,
        schedule=kind,
        train=lambda m, r: seen.append(r),
        evaluate=lambda m: {"loss": F.cross_entropy(m(data[0][0]), data[0][1]).item()},
        quiet=True,
    )
    assert seen == [1, 2, 3, 4]
    for r in report.rounds:
        target = schedule.round_sparsity(0.83, 4, r.round, kind)
        assert r.target == target
        assert r.pruned == round(target * total)
        assert r.achieved == r.pruned / total
        assert "loss" in r.metrics and math.isfinite(r.metrics["loss"])
    assert report.rounds[-1].pruned == round(0.83 * total)
    named = dict(model.named_parameters())
    for n, m in report.masks.items():
        assert int(named[n].detach()[~m].count_nonzero()) == 0


def test_iterative_never_revives_a_pruned_weight():
    """A criterion that scores the already-pruned entries highest: they must stay pruned."""
    model = mlp()
    history = []

    def adversary(m, data):
        scores = {n: p.detach().abs() for n, p in m.named_parameters() if n.endswith("weight")}
        out = {n: torch.where(s == 0, torch.full_like(s, 1e9), s) for n, s in scores.items()}
        history.append({n: s == 0 for n, s in scores.items()})
        return out

    report = schedule.iterative(model, adversary, None, sparsity=0.75, rounds=3, schedule="linear", quiet=True)
    pruned_before = history[-1]  # what rounds 1-2 had pruned, seen by round 3
    for n, m in report.masks.items():
        assert not bool((m & pruned_before[n]).any())


def test_iterative_synflow_data_free_and_magnitude_with_training():
    model = mlp()
    report = schedule.iterative(model, "synflow", None, sparsity=0.9, rounds=10, input_shape=(8,), quiet=True)
    total = sum(m.numel() for m in report.masks.values())
    assert report.rounds[-1].pruned == round(0.9 * total)
    imp = mlp()
    report = schedule.iterative(
        imp, "magnitude", None, sparsity=0.8, rounds=2, train=5, train_data=batches(), quiet=True
    )
    named = dict(imp.named_parameters())
    for n, m in report.masks.items():
        assert int(named[n].detach()[~m].count_nonzero()) == 0


def test_iterative_bad_arguments():
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        schedule.iterative(mlp(), "magnitude", sparsity=0.5, rounds=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule.iterative(mlp(), "magnitude", sparsity=0.5, rounds=2, schedule="cosine")
    with pytest.raises(ValueError, match="needs train_data"):
        schedule.iterative(mlp(), "magnitude", sparsity=0.5, rounds=2, train=3)


def test_sensitivity_restores_the_model_bit_for_bit_and_measures_each_unit():
    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batches()[0]
    calls = []

    @torch.no_grad()
    def evaluate(m):
        calls.append({n: int((p == 0).sum()) for n, p in m.named_parameters() if n.endswith("weight")})
        return {"neg_loss": -F.cross_entropy(m(x), y).item()}

    report = schedule.sensitivity(model, None, evaluate, sparsities=[0.5, 0.9], granularity="layer")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert list(report.curves) == ["0", "2", "4"]
    assert report.metric == "neg_loss" and report.dense == -F.cross_entropy(model(x), y).item()
    # each evaluation after the dense one: exactly one unit pruned, at round(s x its entries)
    for (unit, s), zeros in zip([(u, s) for u in ("0", "2", "4") for s in (0.5, 0.9)], calls[1:]):
        for n, z in zeros.items():
            assert z == (round(s * state[n].numel()) if n == f"{unit}.weight" else 0)
    assert "| 0 | 256 |" in report.table()


def test_block_units():
    names = ["emb.weight", "enc.layer.0.q.weight", "enc.layer.0.k.weight", "enc.layer.1.q.weight", "head.weight"]
    assert schedule.units_of(names, "block") == {
        "emb": ["emb.weight"],
        "enc.layer.0": ["enc.layer.0.q.weight", "enc.layer.0.k.weight"],
        "enc.layer.1": ["enc.layer.1.q.weight"],
        "head": ["head.weight"],
    }


def _report(curves, sizes, sparsities=(0.5, 1.0)):
    return schedule.SensitivityReport(
        metric="acc",
        dense=1.0,
        sparsities=list(sparsities),
        curves=curves,
        units={u: [f"{u}.weight"] for u in curves},
        sizes=sizes,
    )


def test_greedy_allocation_meets_the_budget_with_the_least_predicted_loss():
    # a: cheap to prune, b: costly, c: free up to 0.5 then costly
    report = _report({"a": [0.9, 0.8], "b": [0.5, 0.0], "c": [1.0, 0.2]}, {"a": 100, "b": 100, "c": 200})
    for budget in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        alloc = schedule.allocate(report, budget)
        pruned = sum(alloc[u] * report.sizes[u] for u in alloc)
        assert pruned == pytest.approx(budget * 400, abs=1e-6)
    alloc = schedule.allocate(report, 0.25)  # 100 entries: c's free half
    assert alloc == pytest.approx({"a": 0.0, "b": 0.0, "c": 0.5})
    alloc = schedule.allocate(report, 0.5)  # then a (0.1 per 50) before b or c's expensive half
    assert alloc == pytest.approx({"a": 1.0, "b": 0.0, "c": 0.5})
    assert schedule.predicted_loss(report, alloc) == pytest.approx(0.2)
    # brute force over the measured points: nothing that meets the budget predicts less
    best = min(
        schedule.predicted_loss(report, {"a": a, "b": b, "c": c})
        for a in (0, 0.5, 1)
        for b in (0, 0.5, 1)
        for c in (0, 0.5, 1)
        if a * 100 + b * 100 + c * 200 == 200
    )
    assert schedule.predicted_loss(report, alloc) <= best + 1e-12
    with pytest.raises(ValueError, match="above the highest measured sparsity"):
        schedule.allocate(_report({"a": [0.5]}, {"a": 10}, (0.5,)), 0.6)


def test_allocation_masks_realize_each_units_sparsity():
    model = mlp()
    report = schedule.sensitivity(model, None, lambda m: 1.0, sparsities=[0.5, 1.0])
    alloc = schedule.allocate(report, 0.4)
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if n.endswith("weight")}
    masks = schedule.allocation_masks(report, scores, alloc)
    for unit, names in report.units.items():
        (name,) = names
        assert int((~masks[name]).sum()) == round(min(1.0, alloc[unit]) * masks[name].numel())


def test_finetune_keeps_masks_and_lowers_the_loss():
    model = mlp().eval()
    data = batches()
    masks = half_masks(model)
    ppf.apply_masks(model, masks)
    losses = schedule.finetune(model, data, 16, masks=masks, lr=1e-2)
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4])
    for n, z in zeros_of(model, masks).items():
        assert int(z.count_nonzero()) == 0, n
    assert not model.training


def cli_prune(tmp_path, *extra):
    out = str(tmp_path / "out")
    code = cli.main(["prune", "--model", TINY, "--out", out, "--quiet", *extra])
    with open(os.path.join(out, "report.json")) as f:
        return code, out, json.load(f)


def test_cli_finetune_reports_before_and_after_and_saves_the_finetuned_model(tmp_path, capsys):
    from safetensors.torch import load_file

    code, out, report = cli_prune(
        tmp_path, "--criterion", "magnitude", "--sparsity", "0.8", "--finetune", "10", "--save-model"
    )
    assert code == 0
    (result,) = report["results"]
    assert report["finetune"]["steps"] == 10
    assert set(result["finetuned"]["metrics"]) == {"output_cosine", "top1_agreement"}
    assert result["finetuned"]["metrics"] != result["metrics"]
    # the saved weights are the fine-tuned ones: their metrics are the `finetuned` ones, the masks kept
    bundle = cli_factory.tiny()
    weights = load_file(os.path.join(out, result["files"]["model"]))
    bundle.model.load_state_dict(weights)
    masks = ppf.load_masks(os.path.join(out, result["files"]["masks"]), bundle.model)
    for n, m in masks.items():
        assert int(weights[n][~m].count_nonzero()) == 0
    assert bundle.evaluate(bundle.model) == pytest.approx(result["finetuned"]["metrics"])
    printed = capsys.readouterr().out
    assert "fine-tuned" in printed
    with open(os.path.join(out, "report.md")) as f:
        assert "after fine-tuning" in f.read()


def test_cli_iterative_schedule_reaches_the_sparsity(tmp_path):
    code, _, report = cli_prune(
        tmp_path, "--criterion", "snip", "--sparsity", "0.7", "--schedule", "iterative", "--rounds", "3"
    )
    assert code == 0
    (result,) = report["results"]
    total = sum(math.prod(s) for s in report["model"]["scored_tensors"].values())
    assert result["achieved_sparsity"] == round(0.7 * total) / total
    assert [r["target"] for r in result["rounds"]] == pytest.approx(
        [schedule.round_sparsity(0.7, 3, r) for r in (1, 2, 3)]
    )


def test_cli_sensitivity_writes_table_plot_and_allocation(tmp_path, capsys):
    out = str(tmp_path / "sens")
    code = cli.main(
        ["sensitivity", "--model", TINY, "--out", out, "--quiet", "--sparsity", "0.5", "0.9", "--budget", "0.5"]
    )
    assert code == 0
    with open(os.path.join(out, "sensitivity.json")) as f:
        report = json.load(f)
    assert report["metric"] == "output_cosine"
    assert list(report["curves"]) == ["0", "2", "4"]
    sizes = report["sizes"]
    pruned = sum(report["allocation"][u] * sizes[u] for u in sizes)
    assert pruned == pytest.approx(0.5 * sum(sizes.values()))
    # each curve value: the tiny model with only that layer pruned by magnitude, recomputed here
    bundle = cli_factory.tiny()
    named = dict(bundle.model.named_parameters())
    w = named["2.weight"].detach()
    ppf.masks.global_unstructured({"2.weight": w.abs()}, 0.9, apply_to=named)
    assert report["curves"]["2"][1] == pytest.approx(bundle.evaluate(bundle.model)["output_cosine"])
    with open(os.path.join(out, "sensitivity.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Allocation at a global budget of 0.5" in capsys.readouterr().out
