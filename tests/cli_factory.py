"""Tiny models for the CLI tests (`--model tests.cli_factory:NAME`): each is made the same way on every
call, so a test can rebuild the dense model and recompute the report's numbers independently."""

import os
import signal

import torch
import torch.nn.functional as F
from torch import nn

from pyprune_fast.app.zoo import Bundle

FEATURES, CLASSES = 6, 3


def mlp() -> nn.Module:
    """Linear 6 -> 16 -> 16 -> 3: the first weight's rows (6) are not divisible by 4, the others' are."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def held_out_inputs() -> torch.Tensor:
    return torch.randn(64, FEATURES, generator=torch.Generator().manual_seed(2))


def calibration(count: int = 6, batch: int = 8) -> list:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, FEATURES, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
        for _ in range(count)
    ]


def agreement(model: nn.Module, inputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        out = model(inputs.to(next(model.parameters()).device)).cpu()
    return {
        "output_cosine": F.cosine_similarity(out, reference, dim=1).mean().item(),
        "top1_agreement": (out.argmax(1) == reference.argmax(1)).float().mean().item(),
    }


def tiny() -> Bundle:
    """The MLP with calibration batches (integer targets: the default cross-entropy loss) and an
    evaluation against the dense model's outputs on held-out inputs."""
    model = mlp().eval()
    inputs = held_out_inputs()
    with torch.no_grad():
        reference = model(inputs)
    return Bundle(
        name="tiny-mlp",
        model=model,
        calibration=calibration(),
        evaluate=lambda m: agreement(m, inputs, reference),
        info={"data": "random tensors"},
    )


def unevaluated() -> Bundle:
    """Data, no evaluation."""
    return Bundle(name="tiny-unevaluated", model=mlp().eval(), calibration=calibration())


def bare() -> nn.Module:
    """A bare module: no data, so only data-free criteria apply."""
    return mlp()


def terminated() -> Bundle:
    """The tiny bundle, whose second evaluation (the first pruned model's) sends SIGTERM to its own process."""
    bundle = tiny()
    evaluate, calls = bundle.evaluate, []

    def evaluate_then_die(model):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(model)

    bundle.evaluate = evaluate_then_die
    return bundle


def broken() -> Bundle:
    """A factory that fails, as one whose weights file is missing does."""
    raise RuntimeError("weights file tiny.pt is missing")
