"""What a run prunes: a model with its data, loss and evaluation (`Bundle`), or a causal LM with its
tokenizer and token streams (`LLMBundle`). The model zoo makes them; the runners consume them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass
class Bundle:
    """A model and what it needs to be scored and evaluated.

    calibration: batches `(inputs, targets)` for the criteria (None: data-free criteria only).
    loss_fn(outputs, targets), forward(model, inputs): as in the criteria API.
    evaluate(model) -> {metric: value}, higher = better, the first metric the one criteria are ranked
    by (None: no evaluation).
    input_shape: one sample's shape, for SynFlow when there are no tensor batches.
    data_kind: what `--data` / `--eval-data` give this model: "images" (an image folder, read with
    `preprocess`, a data.Preprocess; default: data.default_preprocess at a (3, H, W) input_shape),
    "text" (read with `tokenizer`), or None (the model takes no files: the default model).
    training: the batches `prune --finetune` trains on, with `loss_fn` (None: `calibration`)."""

    name: str
    model: nn.Module
    calibration: list | None = None
    loss_fn: Callable[[Any, Any], Tensor] | None = None
    forward: Callable[[nn.Module, Any], Any] | None = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    input_shape: tuple[int, ...] | None = None
    params: Callable[[str, nn.Parameter], bool] | None = None
    info: dict = field(default_factory=dict)
    pretrained: nn.Module | None = None  # the Hugging Face model inside `model`, saved with from_pretrained
    tokenizer: Any = None
    data_kind: str | None = None
    training: list | None = None  # batches `--finetune` trains on (None: the calibration batches)
    preprocess: Any = None

    def criterion_kwargs(self, num_batches: int | None = None) -> dict:
        kw: dict = {"loss_fn": self.loss_fn, "forward": self.forward, "params": self.params}
        if num_batches is not None:
            kw["num_batches"] = num_batches
        return kw


PACKAGED_TEXT = "the packaged pydoc_data text"


@dataclass
class LLMBundle:
    """A causal LM, its tokenizer, and disjoint calibration and evaluation token streams (1-D), with
    where each came from (`sources`: "calibration"/"evaluation" → "--data 'PATH'" or PACKAGED_TEXT)."""

    name: str
    model: nn.Module
    tokenizer: Any
    calibration: Tensor
    evaluation: Tensor
    info: dict = field(default_factory=dict)
    checkpoint: str | None = None  # with --offload disk: the checkpoint directory `model` is a skeleton of
    sources: dict = field(default_factory=lambda: {"calibration": PACKAGED_TEXT, "evaluation": PACKAGED_TEXT})


def text_bundle(name: str, model: nn.Module, tokenizer: Any, info: dict | None = None) -> LLMBundle:
    """The bundle of a causal LM on the packaged real text (Python's pydoc_data reference topics, split
    into disjoint calibration and evaluation parts)."""
    from .. import llm

    return LLMBundle(
        name=name,
        model=model,
        tokenizer=tokenizer,
        calibration=llm.pydoc_tokens(tokenizer, "calibration"),
        evaluation=llm.pydoc_tokens(tokenizer, "evaluation"),
        info={
            "data": "Python's pydoc_data reference topics (calibration and held-out evaluation parts)",
            **(info or {}),
        },
    )
