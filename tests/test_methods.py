"""The method protocol (criteria.method): one object per method on every path. A user's method written
in one file is reachable from ppf.score, the CLI's criteria and llm.prune; the built-in methods are
instances of it; the pipeline module names no method; the protocol refuses malformed methods."""

import ast
import importlib.util
import pathlib
import sys
import textwrap

import pytest
import torch
from torch import nn

import pyprune_fast as ppf
from pyprune_fast import criteria, llm
from pyprune_fast.criteria import method as protocol
from pyprune_fast.llm import pipeline
from tests.test_llm_models import VOCAB, tiny_causal_lm

N_SAMPLES, SEQ_LEN = 4, 12

USER_METHOD = '''
"""A user's metric in one file: |W_ij| · ‖X_j‖₂² (Wanda with the squared input norm)."""
from pyprune_fast import criteria


class SquaredWanda(criteria.LayerMethod):
    name = "{name}"
    granularity = "layer"
    observes = frozenset({{"norms"}})

    def score_layer(self, weight, stats):
        return weight.detach().abs().float() * stats.sumsq.to(weight.device).unsqueeze(0)


criteria.register_method(SquaredWanda())
'''


def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (N_SAMPLES * SEQ_LEN,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def user_method(tmp_path_factory):
    """Imports the one-file method above (as a user's module would be) and unregisters it afterwards."""
    name = "squared_wanda_test"
    path = tmp_path_factory.mktemp("user") / "squared_wanda.py"
    path.write_text(USER_METHOD.format(name=name))
    spec = importlib.util.spec_from_file_location("squared_wanda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield name
    protocol.METHODS.pop(name, None)
    criteria.CRITERIA.pop(name, None)
    sys.modules.pop("squared_wanda", None)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_a_users_method_in_one_file_scores_through_ppf_score(user_method):
    net = _net()
    batches = [torch.randn(4, 6), torch.randn(2, 6)]
    got = ppf.score(net, user_method, batches)
    x = torch.cat(batches)
    h = net[1](net[0](x))
    want = {
        "0.weight": net[0].weight.detach().abs() * x.pow(2).sum(0),
        "2.weight": net[2].weight.detach().abs() * h.pow(2).sum(0),
    }
    assert list(got) == list(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=0)
    assert criteria.CRITERIA[user_method].needs == frozenset({"data"})


def test_a_users_method_in_one_file_prunes_through_llm_prune(user_method):
    model = tiny_causal_lm("llama")
    reference = tiny_causal_lm("llama")
    result = llm.prune(
        model, calibration(), method=user_method, sparsity=0.5, num_samples=N_SAMPLES, seq_len=SEQ_LEN, progress=False
    )
    assert result.method == user_method and result.granularity == "layer"
    # the same masks as scoring each block's Linears by the formula on the inputs each block sees
    prefix, blocks = llm.find_blocks(reference)
    inputs = llm.capture_inputs(
        reference, blocks[0], calibration().view(N_SAMPLES, SEQ_LEN).split(1), torch.device("cpu")
    )
    pruned_blocks = llm.find_blocks(model)[1]
    for i, block in enumerate(blocks):
        sums = {}

        def hook(module, args, name, sums=sums):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)

        linears = llm.block_linears(block)
        handles = [lin.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n, lin in linears.items()]
        with torch.no_grad():
            for j in range(len(inputs)):
                inputs.run(block, j)
        for h in handles:
            h.remove()
        for n, lin in linears.items():
            score = lin.weight.detach().abs().float() * sums[n].unsqueeze(0)
            keep = ppf.masks.layerwise({n: score}, 0.5)[n]
            with torch.no_grad():
                lin.weight.masked_fill_(~keep, 0)
            got = llm.block_linears(pruned_blocks[i])[n].weight
            assert torch.equal(got != 0, keep), f"{prefix}.{i}.{n}"
        with torch.no_grad():
            for j in range(len(inputs)):
                inputs.hidden[j] = inputs.run(block, j)


def test_a_users_method_is_one_of_the_clis_criteria(user_method):
    import argparse

    from pyprune_fast.app.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("prune", "score"):
        criterion = next(a for a in commands[command]._actions if a.dest == "criterion")
        assert user_method in criterion.choices, command


def test_a_method_object_is_used_without_registering():
    class Reversed(criteria.LayerMethod):
        name = "reversed_magnitude"
        needs_data = False

        def score_layer(self, weight, stats):
            return -weight.detach().abs().float()

    model = tiny_causal_lm("llama")
    big = {n: lin.weight.detach().abs().clone() for n, lin in llm.block_linears(llm.find_blocks(model)[1][0]).items()}
    llm.prune(model, method=Reversed(), sparsity=0.25, progress=False)
    for n, lin in llm.block_linears(llm.find_blocks(model)[1][0]).items():
        kept = lin.weight.detach() != 0
        assert big[n][kept].max() <= big[n][~kept].min(), n  # the largest weights went first
    assert "reversed_magnitude" not in protocol.METHODS


def test_builtin_methods_are_instances_of_the_protocol():
    assert list(llm.METHODS)[:7] == ["magnitude", "wanda", "sparsegpt", "snip", "refer", "afr", "feature_l1"]
    assert all(isinstance(m, protocol.Method) for m in llm.METHODS.values())
    assert isinstance(llm.METHODS["wanda"], protocol.LayerMethod) and llm.METHODS["wanda"].granularity == "row"
    assert llm.METHODS["sparsegpt"].prunes_in_place and not llm.METHODS["wanda"].prunes_in_place
    # one Wanda: the registry criterion and the pipeline's method call the same per-weight function
    w, norms = torch.randn(4, 6), torch.rand(6)
    stats = criteria.input_stats.InputStats(3, norms.pow(2), None)
    torch.testing.assert_close(
        llm.METHODS["wanda"].score_layer(w, stats), w.abs() * norms.pow(2).sqrt().unsqueeze(0), rtol=0, atol=0
    )


def _code_strings_and_names(path: pathlib.Path) -> set[str]:
    """Identifiers and string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.update(node.value.lower().replace("'", " ").split())
        elif isinstance(node, ast.alias):
            found.update(node.name.split("."))
    return {f.lower() for f in found}


def test_the_pipeline_names_no_method():
    names = _code_strings_and_names(pathlib.Path(pipeline.__file__))
    methods = {m.lower() for m in llm.METHODS} | {"hessian", "local", "obs"}
    assert not names & methods, names & methods


def test_the_checker_finds_a_method_name_in_code(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        textwrap.dedent('''
        """wanda in a docstring is fine."""
        def f(plan):
            if plan.method.name == "sparsegpt":
                return plan.hessian
    ''')
    )
    assert {"sparsegpt", "hessian"} <= _code_strings_and_names(bad)
    assert "wanda" not in _code_strings_and_names(bad)


@pytest.mark.parametrize(
    "method,error,message",
    [
        (criteria.LayerMethod, TypeError, "got the class LayerMethod: call it first"),
        (object(), TypeError, "method must be a method name or a criteria.Method instance, got object"),
        (type("Nameless", (criteria.LayerMethod,), {})(), ValueError, "Nameless.name must be a non-empty str"),
        (
            type("Odd", (criteria.LayerMethod,), {"name": "odd", "observes": frozenset({"grads"})})(),
            ValueError,
            r"odd: observes must be a subset of \('norms', 'xtx', 'sums'\), got \['grads'\]",
        ),
        (
            type("Blind", (criteria.LayerMethod,), {"name": "blind", "needs_data": False, "observes": {"norms"}})(),
            ValueError,
            "blind: a method that observes inputs or targets needs data",
        ),
    ],
)
def test_malformed_methods_are_refused_before_the_model_is_touched(method, error, message):
    model = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        llm.prune(model, calibration(), method=method, num_samples=N_SAMPLES, seq_len=SEQ_LEN, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_method_name_is_registered_once():
    with pytest.raises(ValueError, match="a method named 'wanda' is registered already"):
        criteria.register_method(type("W", (criteria.LayerMethod,), {"name": "wanda"})())


def test_scores_refuses_a_method_that_prunes_in_place():
    with pytest.raises(ValueError, match="sparsegpt has no score per weight"):
        llm.scores(tiny_causal_lm("llama"), calibration(), method="sparsegpt", num_samples=N_SAMPLES, seq_len=SEQ_LEN)
