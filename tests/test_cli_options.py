"""The command line's contract on errors: a user's error is one line and exit status 2, any other
exception a traceback and exit status 1; each command's options object refuses bad values before any
work, naming the library parameter (the command line spells it as its flag); the library-level
runners name no flag."""

import ast
import pathlib

import pytest

import pyprune_fast
from pyprune_fast import UsageError
from pyprune_fast.app import refinement, runner
from pyprune_fast.app.cli import main, options

TINY = "tests.cli_factory:tiny"
APP = pathlib.Path(pyprune_fast.__file__).parent / "app"


def test_usage_error_names_parameters_and_the_cli_spells_them():
    error = UsageError("`batch_size` must be >= 1, got 0; see `rounds`")
    assert isinstance(error, ValueError) and error.parameters == ("batch_size", "rounds")
    assert str(error) == "batch_size must be >= 1, got 0; see rounds"
    assert error.spelled(options.spell) == "--batch-size must be >= 1, got 0; see --rounds"
    assert pyprune_fast.UsageError is UsageError
    quoted = UsageError("`rounds` is wrong: the factory said: set `model_type` (quoted from transformers)")
    assert (
        quoted.spelled(options.flag)
        == "--rounds is wrong: the factory said: set `model_type` (quoted from transformers)"
    )


def test_a_user_error_is_one_line_and_status_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--model", TINY, "--out", str(out), "--rounds", "0"]) == 2
    assert capsys.readouterr().err == "pyprune-fast: error: --rounds must be >= 1, got 0\n"
    assert not out.exists()


def test_a_user_error_raised_inside_a_run_is_status_2(tmp_path, monkeypatch, capsys):
    def refuses(*args, **kwargs):
        raise runner.CriterionDataError("`finetune` needs a loss, which model 'x' does not provide")

    monkeypatch.setattr(runner, "prune", refuses)
    assert main(["prune", "--model", TINY, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == "pyprune-fast: error: --finetune needs a loss, which model 'x' does not provide\n"
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("failure", [ValueError, TypeError, OSError, RuntimeError])
def test_any_other_exception_is_a_bug_traceback_and_status_1(tmp_path, monkeypatch, capsys, failure):
    """A ValueError (or TypeError, OSError, ...) raised by our own code is not the user's error: its
    traceback is printed and the status is 1, and the output directory is left as it was."""

    def bug(*args, **kwargs):
        raise failure("a bug of ours")

    monkeypatch.setattr(runner, "prune", bug)
    assert main(["prune", "--model", TINY, "--out", str(tmp_path / "a" / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{failure.__name__}: a bug of ours" in err
    assert "pyprune-fast: error:" not in err and "internal error" in err
    assert not (tmp_path / "a").exists()


def test_the_options_object_validates_once_with_library_names():
    with pytest.raises(UsageError) as refused:
        options.PruneOptions(model=TINY, rounds=0)
    assert str(refused.value) == "rounds must be >= 1, got 0" and refused.value.parameters == ("rounds",)
    with pytest.raises(UsageError, match="finetune must be >= 0, got -1"):
        options.PruneOptions(model=TINY, finetune=-1)
    with pytest.raises(UsageError) as refused:
        options.PruneOptions(model=TINY, granularity="2:4", sparsity=[0.5])
    assert refused.value.parameters == ("sparsity", "granularity")
    with pytest.raises(UsageError, match=r"sparsity must be in \[0, 1\], got 1.5"):
        options.PruneOptions(model=TINY, sparsity=[1.5])
    with pytest.raises(UsageError, match="batch_size must be >= 1, got 0"):
        options.ScoreOptions(model=TINY, batch_size=0)
    with pytest.raises(UsageError, match="sensitivity takes one criterion"):
        options.SensitivityOptions(model=TINY, criterion=["magnitude", "snip"])
    with pytest.raises(UsageError, match=r"scale must be in \(0, 1\], got 2"):
        options.BenchOptions(scale=2, device="cpu")
    with pytest.raises(UsageError, match="remove_channels applies to granularity channel"):
        options.PruneOptions(model=TINY, remove_channels=True)
    good = options.PruneOptions(model=TINY, criterion=["snip", "snip"], sparsity=[0.9, 0.5], device="cpu")
    assert good.criteria == ["snip"] and good.sparsities == [0.5, 0.9] and good.granularity == "global"
    assert good.refinement == refinement.Refinement("one-shot", 5, 0, 1e-4, 16)


def test_rounds_and_finetune_rules_live_in_one_place():
    """The options object and both runners refuse with the same Refinement: one rule, one message."""
    for kwargs, message in [({"rounds": 0}, "rounds must be >= 1"), ({"finetune": -1}, "finetune must be >= 0")]:
        with pytest.raises(UsageError, match=message):
            refinement.Refinement(**kwargs)
        with pytest.raises(UsageError, match=message):
            runner.prune(None, ["magnitude"], [0.5], **kwargs)
    compared = []  # no module of the application compares rounds or finetune with a bound itself
    for path in APP.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(o, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for o in node.ops
            ):
                names = [n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None) for n in ast.walk(node)]
                if {"rounds", "finetune"} & set(names):
                    compared.append(f"{path.name}:{node.lineno}")
    assert not compared, compared


def _raised_messages(path: pathlib.Path) -> list[str]:
    """The string constants inside the `raise` statements of a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            found += [n.value for n in ast.walk(node.exc) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return found


@pytest.mark.parametrize("module", ["runner.py", "llm_runner.py", "refinement.py", "sensitivity.py", "bundle.py"])
def test_library_level_runners_name_no_command_line_flag(module):
    flags = [m for m in _raised_messages(APP / module) if "--" in m]
    assert not flags, flags
