"""Perplexity of a causal LM on a token stream, with a sliding window.

Windows of at most `seq_len` tokens start every `stride` tokens (stride = seq_len: disjoint windows);
each token is scored at most once, in the first window that holds it after its first position:

    window w = [b_w, e_w), b_w = w·stride, e_w = min(b_w + seq_len, N), until e_w = N
    window w scores tokens t ∈ [max(e_{w−1}, b_w + 1), e_w)   (e_{−1} = 0)
    PPL = exp( Σ_scored −log p(x_t | x_{b_w..t−1}) / #scored )

With stride < seq_len every token after the first is scored, each with at least seq_len − stride
tokens of context. With disjoint windows (the default, as in the SparseGPT and Wanda evaluations)
the first token of each window has no context and is not scored. Windows are batched `batch_size`
at a time; a shorter last window is padded on the right with attention mask 0 and its padding never
scored, so batching does not change the result."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import UsageError
from .blocks import accepts, input_device


def windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over a stream of `length` tokens."""
    out, previous_end, begin = [], 0, 0
    while True:
        end = min(begin + seq_len, length)
        out.append((begin, end, max(previous_end, begin + 1)))
        if end == length:
            return out
        previous_end, begin = end, begin + stride


def _check_fits(model: nn.Module, ids: Tensor, longest: int) -> None:
    """ValueError, before any forward, for what the model cannot take: windows longer than its
    config's max_position_embeddings (learned positions such as OPT's raise IndexError, rotary ones
    silently run outside the lengths they were trained on) or token ids outside its vocabulary."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and longest > limit:
        raise UsageError(
            f"seq_len={longest} (the longest window) exceeds the model's max_position_embeddings ({limit}); "
            f"use seq_len <= {limit}"
        )
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embedding, "num_embeddings", None)
    if vocab is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        bad = low if low < 0 else high
        raise UsageError(
            f"token_ids holds token id {bad}, outside the model's vocabulary of {vocab} (ids 0 to {vocab - 1}); "
            "tokenize the text with this model's tokenizer"
        )


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive int, got {value!r}")
    return value


# Positions whose float32 log-probabilities are computed at once: 4 M floats (16 MB) at most.
CHUNK_ELEMENTS = 1 << 22


def token_nll(logits: Tensor, labels: Tensor, chunk_rows: int | None = None) -> Tensor:
    """−log p(label) of each position whose label is not −100, in float32, in the order of the flat
    positions: cross-entropy of `logits` [..., V] against `labels` [...], computed `chunk_rows`
    positions at a time (default: as many as hold CHUNK_ELEMENTS logits), so that only one chunk's
    logits are ever held in float32 ([positions, V] in float32 would be 1 GB for 2048 positions of a
    128 k vocabulary). Each position's value does not depend on the chunking."""
    vocab = logits.shape[-1]
    flat, targets = logits.reshape(-1, vocab), labels.reshape(-1).to(logits.device)
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    parts = []
    for begin in range(0, flat.shape[0], rows):
        wanted = targets[begin : begin + rows]
        keep = wanted != -100
        if bool(keep.any()):
            chunk = flat[begin : begin + rows][keep].float()
            parts.append(nn.functional.cross_entropy(chunk, wanted[keep], reduction="none"))
    return torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)


def _batches(ids: Tensor, spans: list[tuple[int, int, int]], batch_size: int) -> list[tuple[dict, Tensor]]:
    """(model inputs, labels) of each batch of windows: `batch_size` windows padded on the right (attention
    mask 0 where padded, given only when a window is), labels −100 where a token is not scored."""
    out = []
    for first in range(0, len(spans), batch_size):
        batch = spans[first : first + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (begin, end, start) in enumerate(batch):
            inputs[row, : end - begin] = ids[begin:end]
            mask[row, : end - begin] = 1
            labels[row, start - begin : end - begin] = ids[start:end]
        padded = {"attention_mask": mask} if bool((mask == 0).any()) else {}
        out.append(({"input_ids": inputs, **padded}, labels[:, 1:]))
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module | str | os.PathLike,
    token_ids: Tensor,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    stride: int | None = None,
    progress: bool | None = None,
    offload: str | None = None,
) -> float:
    """exp(mean negative log-likelihood) of a causal LM on a token stream, over the tokens its windows
    score (module docstring).

    Args:
        model: a causal LM returning `.logits`; with offload="disk" the directory of its safetensors
            checkpoint, streamed block by block (llm.offload.DiskStore.logits): host memory holds
            one decoder block, the hidden states of the evaluated tokens and one batch's logits.
        token_ids: the 1-D token stream (or [1, N]), at least 2 tokens, each an id of the model's
            vocabulary.
        seq_len: tokens per window, at least 2 (a window's first token is not scored) and at most the
            config's max_position_embeddings (where the stream is that long); batch_size: windows
            per forward.
        stride: the step between windows (default seq_len: disjoint windows); at most seq_len.
        progress: a tqdm bar; None shows it only on a terminal.
        offload: None (the model in memory) or "disk".

    Returns:
        The perplexity, a float: the same for a model in memory and streamed from its checkpoint. The
        per-token losses (token_nll, float32) of each batch are summed in float64."""
    seq_len, batch_size = _check_positive("seq_len", seq_len), _check_positive("batch_size", batch_size)
    if seq_len < 2:
        raise UsageError(f"seq_len must be an int >= 2 (a window's first token is not scored), got {seq_len}")
    stride = seq_len if stride is None else _check_positive("stride", stride)
    if stride > seq_len:
        raise UsageError(f"stride must be at most seq_len ({seq_len}), got {stride}")
    if offload not in (None, "disk"):
        raise UsageError(f"offload must be None or 'disk', got {offload!r}")
    if not isinstance(token_ids, Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
        raise TypeError(f"token_ids must be an integer tensor, got {type(token_ids).__name__}")
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1 or token_ids.numel() < 2:
        raise UsageError(f"token_ids must be a 1-D stream of at least 2 tokens, got shape {tuple(token_ids.shape)}")
    store = None
    if offload == "disk":
        from .offload import open_disk_model

        model, store = open_disk_model(model)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (or a checkpoint directory with offload='disk'), got "
                        f"{type(model).__name__}")  # fmt: skip
    ids = token_ids.long()
    _check_fits(model, ids, min(seq_len, ids.numel()))
    batches = _batches(ids, windows(ids.numel(), seq_len, stride), batch_size)
    disable = None if progress is None else not progress  # None: tqdm shows the bar only on a terminal
    training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    try:
        if store is not None:
            logits = store.logits([inputs for inputs, _ in batches], progress=disable)
        else:
            logits = _forward(model, [inputs for inputs, _ in batches], disable)
        for (_, labels), batch_logits in zip(batches, logits):
            nll = token_nll(batch_logits[:, :-1], labels)
            total += nll.double().sum().cpu()
            count += nll.numel()
    finally:
        model.train(training)
    return math.exp(total.item() / count)


def _forward(model: nn.Module, batches: list[dict], disable: bool | None) -> Iterator[Tensor]:
    """The model's logits for each batch of inputs, one batch at a time."""
    where = input_device(model)
    extra = {"use_cache": False} if accepts(model, "use_cache") else {}
    with tqdm(total=len(batches), desc="perplexity", unit="batch", disable=disable) as bar:
        for inputs in batches:
            yield model(**{k: v.to(where) for k, v in inputs.items()}, **extra).logits
            bar.update(1)
