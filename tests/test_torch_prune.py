"""The drop-in torch.nn.utils.prune.global_unstructured: PyTorch's own test vectors, and equality with
torch's function on random models (no ties, where torch.topk's choice is unambiguous)."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from pyprune_fast.integrations import torch_prune


def two_layers():
    m, n = nn.Linear(4, 2), nn.Linear(3, 1)
    m.weight = nn.Parameter(torch.tensor([[1, 2, 3, 4], [-4, -3, -2, -1]], dtype=torch.float32))
    n.weight = nn.Parameter(torch.tensor([[0, 0.1, -2]], dtype=torch.float32))
    return m, n


def test_pytorch_vector_global_pruning():
    """test_pruning.py::test_global_pruning"""
    m, n = two_layers()
    torch_prune.global_unstructured(((m, "weight"), (n, "weight")), pruning_method=prune.L1Unstructured, amount=4)
    assert torch.equal(m.weight, torch.tensor([[0, 2, 3, 4], [-4, -3, -2, 0]], dtype=torch.float32))
    assert torch.equal(n.weight, torch.tensor([[0, 0, -2]], dtype=torch.float32))


def test_pytorch_vector_global_pruning_importance_scores():
    """test_pruning.py::test_global_pruning_importance_scores"""
    m, n = two_layers()
    scores = {
        (m, "weight"): torch.tensor([[4, 2, 1, 3], [-3, -1, -2, -4]], dtype=torch.float32),
        (n, "weight"): torch.tensor([[0, 10.0, -0.2]], dtype=torch.float32),
    }
    torch_prune.global_unstructured(
        ((m, "weight"), (n, "weight")), pruning_method=prune.L1Unstructured, amount=4, importance_scores=scores
    )
    assert torch.equal(m.weight, torch.tensor([[1, 2, 0, 4], [-4, 0, -2, -1]], dtype=torch.float32))
    assert torch.equal(n.weight, torch.tensor([[0, 0.1, 0]], dtype=torch.float32))


def test_pytorch_vector_repeated_pruning_respects_previous_mask():
    """test_pruning.py::test_l1_unstructured_pruning (and _with_importance_scores), through the global path"""
    m, _ = two_layers()
    torch_prune.global_unstructured([(m, "weight")], prune.L1Unstructured, amount=2)
    assert torch.equal(m.weight, torch.tensor([[0, 2, 3, 4], [-4, -3, -2, 0]], dtype=torch.float32))
    torch_prune.global_unstructured([(m, "weight")], prune.L1Unstructured, amount=2)
    assert torch.equal(m.weight, torch.tensor([[0, 0, 3, 4], [-4, -3, 0, 0]], dtype=torch.float32))
    m, _ = two_layers()
    scores = {(m, "weight"): torch.tensor([[4, 2, 1, 3], [-3, -1, -2, -4]], dtype=torch.float32)}
    for expected in ([[1, 2, 0, 4], [-4, 0, -2, -1]], [[1, 0, 0, 4], [-4, 0, 0, -1]]):
        torch_prune.global_unstructured([(m, "weight")], prune.L1Unstructured, amount=2, importance_scores=scores)
        assert torch.equal(m.weight, torch.tensor(expected, dtype=torch.float32))


def test_pytorch_vector_prior_mask():
    """test_pruning.py::test_pruning_container_compute_mask (unstructured part): only entries whose
    prior mask is 1 compete."""
    m = nn.Linear(4, 2)
    m.weight = nn.Parameter(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.float32))
    prune.custom_from_mask(m, "weight", torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]]))
    torch_prune.global_unstructured([(m, "weight")], prune.L1Unstructured, amount=2)
    assert torch.equal(m.weight_mask, torch.tensor([[0, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.float32))


def test_pytorch_vector_same_magnitude_exact_count():
    """test_pruning.py::test_unstructured_pruning_same_magnitude: ties are pruned by count, not threshold"""
    m = nn.Linear(7, 10, bias=False)
    with torch.no_grad():
        m.weight.copy_(2 * torch.randint(-1, 2, (10, 7), generator=torch.Generator().manual_seed(0)).float())
    torch_prune.global_unstructured([(m, "weight")], prune.L1Unstructured, amount=0.2)
    assert int((m.weight_mask == 0).sum()) == prune._compute_nparams_toprune(0.2, 70)


def model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.Linear(10, 3))


def targets(net):
    return [(net[0], "weight"), (net[3], "weight"), (net[3], "bias"), (net[4], "weight")]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("amounts", [(0.5,), (0.3, 0.4), (37,), (0.0,), (1.0,), (50, 0.9)])
def test_same_results_as_torch(seed, amounts):
    ours, theirs = model(seed), model(seed)
    scores_ours = {(m, n): torch.randn_like(getattr(m, n)) for m, n in targets(ours)}
    scores_theirs = {(m, n): s for (m, n), s in zip(targets(theirs), scores_ours.values())}
    for amount in amounts:
        torch_prune.global_unstructured(
            targets(ours), prune.L1Unstructured, importance_scores=scores_ours, amount=amount
        )
        prune.global_unstructured(targets(theirs), prune.L1Unstructured, importance_scores=scores_theirs, amount=amount)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)  # weight_orig / weight_mask reparametrization
    for key in sd_theirs:
        assert torch.equal(sd_ours[key], sd_theirs[key]), key
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(ours(x), theirs(x))
    prune.remove(ours[0], "weight")
    assert "0.weight" in ours.state_dict()


def test_other_methods_are_torchs():
    ours, theirs = model(0), model(0)
    torch.manual_seed(5)
    torch_prune.global_unstructured(targets(ours), prune.RandomUnstructured, amount=0.5)
    torch.manual_seed(5)
    prune.global_unstructured(targets(theirs), prune.RandomUnstructured, amount=0.5)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_errors_match_torch():
    m, n = two_layers()
    with pytest.raises(TypeError, match="parameters is not an Iterable"):
        torch_prune.global_unstructured(5, prune.L1Unstructured, amount=1)
    with pytest.raises(TypeError, match="importance_scores must be of type dict"):
        torch_prune.global_unstructured([(m, "weight")], prune.L1Unstructured, importance_scores=[1], amount=1)
    with pytest.raises(TypeError, match='Only "unstructured" PRUNING_TYPE supported'):
        torch_prune.global_unstructured([(m, "weight")], prune.LnStructured, amount=1, n=2, dim=0)
    with pytest.raises(ValueError, match="amount=20 should be smaller than the number of parameters to prune=11"):
        torch_prune.global_unstructured([(m, "weight"), (n, "weight")], prune.L1Unstructured, amount=20)
    with pytest.raises(ValueError, match="amount=1.5 should either be a float in the range"):
        torch_prune.global_unstructured([(m, "weight")], prune.L1Unstructured, amount=1.5)
    scores = {(m, "weight"): torch.full((2, 4), float("nan"))}
    with pytest.raises(ValueError, match=r"importance of Linear.weight \(parameters\[0\]\) contains NaN"):
        torch_prune.global_unstructured([(m, "weight")], prune.L1Unstructured, importance_scores=scores, amount=1)
    assert not hasattr(m, "weight_mask")  # nothing half-applied


def test_original_untouched_on_copy():
    net = model(1)
    before = copy.deepcopy(net.state_dict())
    torch_prune.global_unstructured(targets(net), prune.L1Unstructured, amount=0.5)
    assert torch.equal(net[0].weight_orig, before["0.weight"])


def state(*modules):
    return [
        (dict(m.state_dict()), dict(m._forward_pre_hooks), {n: p.clone() for n, p in m.named_parameters()})
        for m in modules
    ]


def same_state(before, after):
    for (sd0, hooks0, params0), (sd1, hooks1, params1) in zip(before, after):
        assert list(sd0) == list(sd1) and hooks0 == hooks1 and list(params0) == list(params1)
        assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.ones(3, 4), ValueError, r"importance of Linear.weight \(parameters\[1\]\) has shape \(3, 4\)"),
        (torch.ones(1, 3).tolist(), TypeError, r"importance of Linear.weight \(parameters\[1\]\) must be a Tensor"),
        (torch.ones(1, 3, dtype=torch.bool), TypeError, "must be a real-valued tensor, got torch.bool"),
        (torch.ones(1, 3, dtype=torch.complex64), TypeError, "must be a real-valued tensor"),
    ],
)
def test_a_bad_entry_leaves_every_module_untouched(bad, error, message):
    """The first parameter's scores are fine, the second's are not: torch's own function (and ours
    before) pruned the first, then failed; now nothing is changed."""
    m, n = two_layers()
    prune.custom_from_mask(n, "bias", torch.tensor([1.0]))  # an earlier pruning stays as it was
    before = state(m, n)
    scores = {(m, "weight"): torch.randn(2, 4), (n, "weight"): bad}
    with pytest.raises(error, match=message):
        torch_prune.global_unstructured(
            [(m, "weight"), (n, "weight"), (n, "bias")], prune.L1Unstructured, importance_scores=scores, amount=3
        )
    same_state(before, state(m, n))
    assert not hasattr(m, "weight_mask")


def test_bad_parameter_entries_are_refused_before_any_change():
    m, n = two_layers()
    n.register_buffer("scale", torch.ones(3))
    before = state(m, n)
    with pytest.raises(AttributeError, match=r"parameters\[1\]: 'Linear' object has no attribute 'nope'"):
        torch_prune.global_unstructured([(m, "weight"), (n, "nope")], prune.L1Unstructured, amount=1)
    with pytest.raises(TypeError, match=r"parameters\[1\]: Linear.scale is a Tensor, not a parameter"):
        torch_prune.global_unstructured([(m, "weight"), (n, "scale")], prune.L1Unstructured, amount=1)
    with pytest.raises(TypeError, match=r"parameters\[1\] must be a \(module, name\) pair"):
        torch_prune.global_unstructured([(m, "weight"), n], prune.L1Unstructured, amount=1)
    same_state(before, state(m, n))


def test_integer_scores_amount_true_and_no_parameters_as_torch():
    scores = torch.tensor([[1, 5, 3, 2], [7, -8, 0, 4]])
    ours, theirs = nn.Linear(4, 2), nn.Linear(4, 2)
    torch_prune.global_unstructured(
        [(ours, "weight")], prune.L1Unstructured, amount=3, importance_scores={(ours, "weight"): scores}
    )
    prune.global_unstructured(
        [(theirs, "weight")], prune.L1Unstructured, amount=3, importance_scores={(theirs, "weight"): scores}
    )
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    assert torch.equal(ours.weight_mask, torch.tensor([[0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.float32))
    # integers beyond float32's 2**24 keep their order (compared as float64)
    big = torch.tensor([[2**40 + 3, 2**40 + 2, 2**40, 2**40 + 1]])
    m = nn.Linear(4, 1)
    torch_prune.global_unstructured(
        [(m, "weight")], prune.L1Unstructured, amount=2, importance_scores={(m, "weight"): big}
    )
    assert m.weight_mask.tolist() == [[1.0, 1.0, 0.0, 0.0]]

    m = nn.Linear(4, 2)
    with pytest.raises(TypeError):  # torch: topk() argument 'k' must be int, not bool
        prune.global_unstructured([(m, "weight")], prune.L1Unstructured, amount=True)
    with pytest.raises(TypeError, match="Invalid type for amount: True"):
        torch_prune.global_unstructured([(m, "weight")], prune.L1Unstructured, amount=True)
    assert not hasattr(m, "weight_mask")
    with pytest.raises(ValueError):  # torch: torch.cat(): expected a non-empty list of Tensors
        prune.global_unstructured([], prune.L1Unstructured, amount=0.5)
    for amount in (0.5, 0):
        with pytest.raises(ValueError, match="parameters is empty"):
            torch_prune.global_unstructured([], prune.L1Unstructured, amount=amount)
