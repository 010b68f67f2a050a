"""Token streams for calibration and evaluation: fixed-length calibration windows from token ids, and
real English text that ships with Python itself (the reference topics of `pydoc_data`, the text
behind `help('assert')`), split by topic into disjoint calibration and evaluation parts."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageError

SPLITS = ("calibration", "evaluation")


def calibration_windows(token_ids: Tensor, num_samples: int, seq_len: int) -> Tensor:
    """Calibration sequences cut from token ids, never padded, never repeated (ValueError when there are
    fewer tokens than asked).

    Args:
        token_ids: a 1-D token stream (cut into consecutive non-overlapping windows) or 2-D
            [sequences, tokens] (its first rows and columns are taken).
        num_samples, seq_len: how many sequences of how many tokens.

    Returns:
        [num_samples, seq_len] int64."""
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(token_ids, Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
        raise TypeError(f"calibration must be an integer tensor of token ids, got {type(token_ids).__name__}")
    if token_ids.dim() == 1:
        if token_ids.numel() < num_samples * seq_len:
            raise UsageError(
                f"calibration has {token_ids.numel()} tokens, fewer than num_samples × seq_len = "
                f"{num_samples} × {seq_len} = {num_samples * seq_len}"
            )
        return token_ids[: num_samples * seq_len].reshape(num_samples, seq_len).long()
    if token_ids.dim() == 2:
        rows, cols = token_ids.shape
        if rows < num_samples or cols < seq_len:
            raise UsageError(
                f"calibration has {rows} sequences of {cols} tokens, fewer than the {num_samples} sequences "
                f"of {seq_len} tokens asked (num_samples, seq_len)"
            )
        return token_ids[:num_samples, :seq_len].long()
    raise UsageError(f"calibration must be 1-D (a token stream) or 2-D (sequences), got shape {tuple(token_ids.shape)}")


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def pydoc_text(split: str, held_out_every: int = 4) -> str:
    """The text of Python's `pydoc_data` reference topics, in topic order: every `held_out_every`-th
    topic (0, 4, 8, ... of the sorted names) is the evaluation part, the others the calibration part.
    The reference repeats some paragraphs in several topics ("See also:", shared sections): the
    evaluation part leaves out every paragraph that also occurs in the calibration part, so the two
    share no paragraph. Paragraphs are separated by a blank line."""
    from pydoc_data.topics import topics

    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(held_out_every, bool) or not isinstance(held_out_every, int) or held_out_every < 2:
        raise UsageError(f"held_out_every must be an int >= 2, got {held_out_every!r}")
    names = sorted(topics)
    held = [p for i, t in enumerate(names) if i % held_out_every == 0 for p in _paragraphs(topics[t])]
    calibration = [p for i, t in enumerate(names) if i % held_out_every != 0 for p in _paragraphs(topics[t])]
    if split == "calibration":
        return "\n\n".join(calibration)
    seen = set(calibration)
    return "\n\n".join(p for p in held if p not in seen)


def pydoc_tokens(tokenizer: Any, split: str, held_out_every: int = 4) -> Tensor:
    """The `pydoc_text` part tokenized as one stream.

    Args:
        tokenizer: a Hugging Face tokenizer; split: "calibration" or "evaluation";
        held_out_every: as for `pydoc_text`.

    Returns:
        1-D int64 token ids, no special tokens."""
    ids = tokenizer(pydoc_text(split, held_out_every), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
