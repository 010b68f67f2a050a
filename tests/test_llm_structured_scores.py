"""The scores of structured pruning (llm.structured.SCORES) against their formulas written out here on a
tiny random Llama (grouped-query attention), OPT (multi-head attention) and GPT-NeoX (packed
query_key_value, parallel residual): the block-0 score of every
MLP channel and query head, and that the run keeps the highest-scored ones."""

import pytest
import torch
from torch import nn

from pyprune_fast import llm
from pyprune_fast.llm.structured import SCORES
from pyprune_fast.llm.structured.width import WidthRun
from tests.test_llm_structured import CALIB, OPTS, tiny

transformers = pytest.importorskip("transformers")

NAMES = {
    "llama": dict(
        blocks="model.layers",
        producers=("mlp.gate_proj", "mlp.up_proj"),
        consumer="mlp.down_proj",
        o="self_attn.o_proj",
    ),
    "opt": dict(blocks="model.decoder.layers", producers=("fc1",), consumer="fc2", o="self_attn.out_proj"),
    "gpt_neox": dict(
        blocks="gpt_neox.layers", producers=("mlp.dense_h_to_4h",), consumer="mlp.dense_4h_to_h", o="attention.dense"
    ),
}
D, HEADS = 8, 4
GROUPS = {"llama": 2, "opt": 1, "gpt_neox": 1}  # the groups heads are removed from: key/value groups; all heads (MHA)


def _block0_call(model: nn.Module, names: dict) -> list[tuple[tuple, dict]]:
    """Every argument block 0 is called with, one calibration sequence at a time."""
    block = model.get_submodule(names["blocks"])[0]
    calls = []

    def hook(_m, args, kwargs):
        calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for row in CALIB:
            model(row[None], use_cache=False)
    handle.remove()
    return calls


def _out(value):
    return value[0] if isinstance(value, tuple) else value


def _masked_run(block: nn.Module, names: dict, call, masks: dict, shifts: dict):
    """The block on one call with its consumer inputs replaced by x ⊙ mask + shift; returns (output, x)."""
    seen = {}
    handles = []
    for part, path in (("mlp", names["consumer"]), ("attention", names["o"])):

        def hook(_m, args, part=part):
            seen[part] = args[0].detach()
            return (args[0] * masks[part] + shifts[part],)

        handles.append(block.get_submodule(path).register_forward_pre_hook(hook))
    try:
        out = _out(block(*call[0], **call[1]))
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _weight(block, path):
    return block.get_submodule(path).weight.detach().double()


def _per_head(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(*v.shape[:-1], -1, D).sum(-1)


def _head_rows(block, arch: str, per_row) -> torch.Tensor:
    """Σ per_row(weight) over each head's filter rows: q (Llama); q, k and v (OPT); its 3·d contiguous
    rows of the packed query_key_value (GPT-NeoX)."""
    if arch == "gpt_neox":
        return per_row(_weight(block, "attention.query_key_value")).reshape(HEADS, 3 * D).sum(1)
    attn = ["self_attn.q_proj"] + (["self_attn.k_proj", "self_attn.v_proj"] if arch == "opt" else [])
    return sum(_per_head(per_row(_weight(block, n))) for n in attn)


def _query_rows(block, arch: str) -> torch.Tensor:
    """Each head's query rows [heads, rows, hidden] (GPT-NeoX: its q | k | v rows)."""
    if arch == "gpt_neox":
        return block.attention.query_key_value.weight.reshape(-1, 3 * D, 32)
    return block.self_attn.q_proj.weight.reshape(-1, D, 32)


def _candidate(block, names, arch, channels, heads_per_group):
    """The magnitude candidate's masks: the lowest ‖coupled weights‖₂ channels and heads set to 0."""
    down, o = _weight(block, names["consumer"]), _weight(block, names["o"])
    ch = down.pow(2).sum(0) + sum(_weight(block, p).pow(2).sum(1) for p in names["producers"])
    hd = _per_head(o.pow(2).sum(0)) + _head_rows(block, arch, lambda w: w.pow(2).sum(1))
    mlp = torch.ones(down.shape[1], dtype=torch.float64)
    mlp[torch.argsort(ch)[:channels]] = 0
    head_mask = torch.ones(HEADS, dtype=torch.float64)
    g = HEADS // GROUPS[arch]
    for k, group in enumerate(hd.reshape(GROUPS[arch], g).argsort(1)):
        head_mask[group[:heads_per_group] + k * g] = 0
    return {"mlp": mlp.float(), "attention": head_mask.repeat_interleave(D).float()}


def _gradient_scores(score, model, names, arch, channels, heads_per_group):
    """Taylor / Fisher / Ide of block 0 written out: per calibration sequence n, the reconstruction error
    L_n = ‖f(X_n; M_c) − Y_n‖² at the magnitude candidate M_c, x_n the unmasked consumer input and
    ∇_n = ∂L_n/∂(x ⊙ m) (through an added zero shift), x_nᵀ∇_n = ∂L_n/∂m summed per head."""
    block = model.get_submodule(names["blocks"])[0]
    candidate = _candidate(block, names, arch, channels, heads_per_group)
    dots, xs, gs = {"mlp": [], "attention": []}, {"mlp": [], "attention": []}, {"mlp": [], "attention": []}
    for call in _block0_call(model, names):
        with torch.no_grad():
            target = _out(block(*call[0], **call[1]))
        masks = {k: v.clone().requires_grad_(True) for k, v in candidate.items()}
        widths = {"mlp": len(candidate["mlp"]), "attention": HEADS * D}
        shifts = {k: torch.zeros(CALIB.shape[1], w, requires_grad=True) for k, w in widths.items()}
        with torch.enable_grad():
            out, x = _masked_run(block, names, call, masks, shifts)
            loss = (out - target).pow(2).sum()
            grads = torch.autograd.grad(loss, [masks["mlp"], masks["attention"], shifts["mlp"], shifts["attention"]])
        for k, dm, g in (("mlp", grads[0], grads[2]), ("attention", grads[1], grads[3])):
            dots[k].append(dm.double() if k == "mlp" else _per_head(dm.double()))
            xs[k].append(x[k].reshape(-1, x[k].shape[-1]).double())  # OPT's MLP takes [tokens, C]
            gs[k].append(g.reshape(-1, g.shape[-1]).double())
    out = {}
    for k in ("mlp", "attention"):
        dot = torch.stack(dots[k])
        if score == "taylor":
            out[k] = dot.mean(0).abs()
        elif score == "fisher":
            out[k] = dot.pow(2).mean(0)
        else:
            prod = (torch.stack(xs[k]).mean(0) * torch.stack(gs[k]).mean(0)).sum(0)
            out[k] = (prod if k == "mlp" else _per_head(prod)).square()
    return out["mlp"], out["attention"]


def _expected(score, model, names, arch, channels, heads_per_group):
    block = model.get_submodule(names["blocks"])[0]
    if score in ("taylor", "fisher", "ide"):
        return _gradient_scores(score, model, names, arch, channels, heads_per_group)
    down, o = _weight(block, names["consumer"]), _weight(block, names["o"])
    if score in ("l1", "l2"):
        p = 1 if score == "l1" else 2
        ch = sum(_weight(block, n).abs().pow(p).sum(1) for n in names["producers"]) ** (1 / p)
        hd = _head_rows(block, arch, lambda w: w.abs().pow(p).sum(1)) ** (1 / p)
        return ch, hd
    if score == "magnitude":
        ch = down.pow(2).sum(0) + sum(_weight(block, n).pow(2).sum(1) for n in names["producers"])
        hd = _per_head(o.pow(2).sum(0)) + _head_rows(block, arch, lambda w: w.pow(2).sum(1))
        return ch.sqrt(), hd.sqrt()
    xs = {"mlp": [], "attention": []}
    for call in _block0_call(model, names):
        ones = {"mlp": torch.ones(down.shape[1]), "attention": torch.ones(HEADS * D)}
        with torch.no_grad():
            _, x = _masked_run(block, names, call, ones, {"mlp": 0.0, "attention": 0.0})
        for k in xs:
            xs[k].append(x[k].reshape(-1, x[k].shape[-1]).double())
    x_mlp, x_attn = torch.cat(xs["mlp"]), torch.cat(xs["attention"])
    if score == "wanda":
        return down.abs().sum(0) * x_mlp.norm(dim=0), _per_head(o.abs().sum(0) * x_attn.norm(dim=0))
    var = {k: v.var(0, unbiased=False) for k, v in (("mlp", x_mlp), ("attention", x_attn))}
    return var["mlp"] * down.pow(2).sum(0), _per_head(var["attention"] * o.pow(2).sum(0))


@pytest.mark.parametrize("arch", list(NAMES))
@pytest.mark.parametrize("score", list(SCORES))
def test_block_scores_match_their_formula_and_the_lowest_go(score, arch, monkeypatch):
    names = NAMES[arch]
    model, dense = tiny(arch), tiny(arch)
    seen = []
    original = WidthRun.scores

    def spy(self, i, observed):
        out = original(self, i, observed)
        seen.append((i, out))
        return out

    monkeypatch.setattr(WidthRun, "scores", spy)
    result = llm.prune_structured(model, CALIB, ratio=0.5, score=score, **OPTS)
    width, heads = result.intermediate[0], result.heads[0]
    channels, heads_per_group = 64 - width, (HEADS - heads) // GROUPS[arch]
    assert 0 < width < 64 and heads < HEADS
    ch, hd = _expected(score, dense, names, arch, channels, heads_per_group)
    got_ch, got_hd = next(out for i, out in seen if i == 0)
    torch.testing.assert_close(got_ch.double(), ch, rtol=2e-4, atol=1e-6 * float(ch.abs().max()))
    torch.testing.assert_close(got_hd.double(), hd, rtol=2e-4, atol=1e-6 * float(hd.abs().max()))
    keep = torch.argsort(ch, stable=True)[channels:].sort().values
    producer = names["producers"][0]
    block, ref = model.get_submodule(names["blocks"])[0], dense.get_submodule(names["blocks"])[0]
    assert torch.equal(block.get_submodule(producer).weight, ref.get_submodule(producer).weight[keep])
    q, q_ref = _query_rows(block, arch), _query_rows(ref, arch)
    kept = [next(h for h in range(HEADS) if torch.equal(q[j], q_ref[h])) for j in range(len(q))]
    g = HEADS // GROUPS[arch]
    per_group = hd.reshape(GROUPS[arch], g)
    expected = [int(h) + k * g for k, s in enumerate(per_group) for h in s.argsort()[heads_per_group:]]
    assert kept == sorted(expected)


def test_the_registry_says_what_each_score_reads():
    assert {n for n, s in SCORES.items() if s.gradients} == {"taylor", "fisher", "ide"}
    assert {n for n, s in SCORES.items() if s.statistics} == {"wanda", "flap"}
    assert all(s.cite for s in SCORES.values())
    assert list(SCORES)[:3] == ["magnitude", "wanda", "flap"]


def test_global_allocation_with_lp_normalization():
    """normalize="lp": one threshold over √S / ‖√S‖_p of each block (written out here), not over z-scores."""
    from pyprune_fast.llm.structured import structure_of
    from pyprune_fast.llm.structured.width import Counts, global_counts

    s = structure_of(tiny("llama", layers=2))
    g = torch.Generator().manual_seed(3)
    scores = [
        (torch.rand(64, generator=g) * 100, torch.rand(4, generator=g)),
        (torch.rand(64, generator=g) ** 4, torch.rand(4, generator=g) * 9),
    ]
    uniform = [Counts(1, 20), Counts(1, 20)]
    p = 0.5
    lp = [(c.double().sqrt() / c.double().sqrt().pow(p).sum().pow(1 / p)) for c, _ in scores]
    order = sorted((float(v), b, j) for b, z in enumerate(lp) for j, v in enumerate(z))
    taken = [0, 0]
    for _, b, _ in order:  # the 40 lowest, each block keeping at least ceil(0.1 × 64) = 7
        if sum(taken) < 40 and taken[b] < 64 - 7:
            taken[b] += 1
    got = global_counts(s, uniform, scores, 0.1, 1, "lp", p)
    assert [c.channels for c in got] == taken
    assert sum(c.heads for c in got) == 2 and [c.channels for c in global_counts(s, uniform, scores, 0.1)] != taken
