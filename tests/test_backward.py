"""Gradients consumed inside the backward pass (criteria.backward): the same values as the plain
autograd path, every gradient released as soon as it is consumed, `.grad` given back untouched."""

import weakref

import pytest
import torch
import torch.nn.functional as F

import pyprune_fast as ppf
from pyprune_fast import ops
from pyprune_fast.criteria.backward import RunningSum, backward_each, with_last
from tests.models import image_batches, tiny_vit
from tests.test_criteria import scored


def plain_grad_sums(model, data, params):
    """Σ_b ∂L_b/∂w by torch.autograd.grad, summed in batch order (the plain path)."""
    total = None
    for x, y in data:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        total = [t.clone() for t in g] if total is None else [a.add_(b) for a, b in zip(total, g)]
    return total


@pytest.mark.parametrize("batches", [1, 3])
def test_fused_snip_and_obd_equal_the_plain_path_bit_for_bit(batches):
    model = tiny_vit(0)
    data = image_batches(0, count=batches)
    params = scored(model)
    plist = list(params.values())
    weights = [p.detach() for p in plist]
    snip, _ = ops.saliency(plain_grad_sums(model, data, plist), weights)
    acc = [torch.zeros_like(w) for w in weights]
    for x, y in data:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), plist)
        ops.saliency_accumulate_(acc, list(g), weights, scale=0.5, power=2)
    obd = [a * (1.0 / batches) for a in acc]
    for name, expected in (("snip", snip), ("obd", obd)):
        got = ppf.score(model, name, data)
        assert list(got) == list(params)
        for n, e in zip(params, expected):
            assert torch.equal(got[n], e), (name, n)


def test_num_batches_limits_the_fused_snip():
    model = tiny_vit(1)
    data = image_batches(1, count=3)
    first_two = ppf.score(model, "snip", data[:2])
    limited = ppf.score(model, "snip", data, num_batches=2)
    assert all(torch.equal(limited[n], first_two[n]) for n in first_two)


@pytest.mark.parametrize("name", ["snip", "obd", "grasp", "feature_l1", "refer", "afr"])
def test_at_most_one_scored_gradient_is_resident_during_the_backward(name):
    """A hook registered before ours sees each scored gradient when autograd accumulates it: no other
    scored parameter may hold a .grad then, and every gradient seen before must have been freed."""
    model = tiny_vit(2)
    data = image_batches(2, count=2)
    params = list(scored(model).values())
    resident, alive, seen = [], [], []

    def watch(p):
        resident.append(sum(q.grad is not None for q in params))
        alive.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(p.grad))

    handles = [p.register_post_accumulate_grad_hook(watch) for p in params]
    try:
        ppf.score(model, name, data)
    finally:
        for h in handles:
            h.remove()
    assert len(resident) >= 2 * len(params)
    assert set(resident) == {1}
    if name in ("snip", "obd"):  # nothing kept: each gradient is freed by the time the next one arrives
        assert set(alive) == {0}


@pytest.mark.parametrize("name", ["snip", "obd", "grasp", "afr"])
def test_existing_grads_come_back_as_the_same_objects(name):
    model = tiny_vit(3)
    data = image_batches(3)
    params = dict(model.named_parameters())
    params["blocks.0.fc1.weight"].grad = torch.full_like(params["blocks.0.fc1.weight"], 2.0)
    params["head.bias"].grad = torch.ones_like(params["head.bias"])
    before = {n: p.grad for n, p in params.items()}
    copies = {n: None if g is None else g.clone() for n, g in before.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    ppf.score(model, name, data)
    for n, p in params.items():
        assert p.grad is before[n], n
        assert copies[n] is None or torch.equal(p.grad, copies[n]), n
        assert p.requires_grad == flags[n], n


def test_backward_each_gives_each_gradient_once_and_restores_grad():
    w1 = torch.randn(3, 4, requires_grad=True)
    w2 = torch.randn(4, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    w1.grad = torch.ones(3, 4)
    keep = w1.grad
    x = torch.randn(5, 3)
    objective = ((x @ w1) * w2).square().sum()
    expected = torch.autograd.grad(objective, [w1, w2], retain_graph=True)
    got = {}
    backward_each(objective, [w1, w2, unused], lambda i, g: got.setdefault(i, g.clone()))
    assert sorted(got) == [0, 1]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert w1.grad is keep and torch.equal(keep, torch.ones(3, 4)) and w2.grad is None and unused.grad is None
    with pytest.raises(ValueError, match="no gradient path"):
        backward_each(x.sum(), [w1], lambda i, g: None)


def test_running_sum_is_zero_where_no_batch_reached_and_with_last_marks_the_end():
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    total = RunningSum([a, b])
    total.backward((2 * a).sum())
    total.backward((3 * a).sum())
    assert torch.equal(total.value()[0], torch.full((3,), 5.0)) and torch.equal(total.take(1), torch.zeros(2))
    assert list(with_last([])) == [] and list(with_last("ab")) == [("a", False), ("b", True)]
