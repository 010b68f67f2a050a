"""Perplexity against a direct computation: one window at a time, the model's own loss on the labels
of the tokens not yet scored (the classic sliding-window loop), for any stride and batch size."""

import importlib
import math

import pytest
import torch
from torch import nn

from pyprune_fast import llm
from pyprune_fast.llm.perplexity import windows
from tests.test_llm_models import VOCAB, tiny_causal_lm


def direct(model, ids, seq_len, stride):
    """exp(Σ NLL / count): windows [begin, begin + seq_len) every `stride` tokens; in each, only the
    tokens after the previous window's end are labelled; the model's loss is the mean over labels."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        window = ids[begin:end].unsqueeze(0)
        labels = window.clone()
        labels[:, : -(end - previous_end)] = -100
        targets = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(window, labels=labels, use_cache=False).loss
        total, count = total + float(loss) * targets, count + targets
        previous_end = end
        if end == len(ids):
            break
    return math.exp(total / count), count


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("seq_len,stride", [(16, None), (16, 8), (16, 5), (50, None), (7, 7)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_equals_direct_computation(arch, seq_len, stride, batch_size):
    model = tiny_causal_lm(arch)
    ids = torch.randint(0, VOCAB, (45,), generator=torch.Generator().manual_seed(2))
    step = stride or seq_len
    expected, count = direct(model, ids, seq_len, step)
    assert count == len(ids) - (1 if step < seq_len else len(range(0, len(ids), step)))
    got = llm.perplexity(model, ids, seq_len=seq_len, batch_size=batch_size, stride=stride, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_every_token_with_context_is_scored_once():
    """Overlapping windows score every token after the first; disjoint ones all but window starts."""
    for length in (2, 3, 17, 64, 65):
        for seq_len in (2, 5, 16):
            for stride in range(1, seq_len + 1):
                spans = windows(length, seq_len, stride)
                scored = []
                for begin, end, first in spans:
                    assert begin < first <= end <= begin + seq_len
                    scored += range(first, end)
                starts = {0} if stride < seq_len else {begin for begin, _, _ in spans}
                assert scored == [t for t in range(length) if t not in starts], (length, seq_len, stride)


def test_disjoint_windows_average_their_losses():
    model = tiny_causal_lm("qwen2")
    ids = torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        losses = [model(chunk[None], labels=chunk[None]).loss for chunk in ids.split(16)]
    expected = math.exp(sum(float(v) * 15 for v in losses) / 30)
    assert llm.perplexity(model, ids[None], seq_len=16, progress=False) == pytest.approx(expected, rel=1e-5)


def test_bad_arguments_and_training_mode():
    model = tiny_causal_lm("llama").train()
    ids = torch.randint(0, VOCAB, (20,))
    with pytest.raises(ValueError, match="stride must be at most seq_len"):
        llm.perplexity(model, ids, seq_len=8, stride=9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        llm.perplexity(model, ids[:1], seq_len=8)
    with pytest.raises(TypeError, match="integer tensor"):
        llm.perplexity(model, ids.float(), seq_len=8)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        llm.perplexity(model, ids, seq_len=0)
    llm.perplexity(model, ids, seq_len=8, progress=False)
    assert model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loss_chunked_over_positions_equals_the_unchunked_one(monkeypatch, dtype):
    perplexity = importlib.import_module("pyprune_fast.llm.perplexity")  # the module (llm.perplexity: the function)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 17, 1000, generator=g) * 8).to(dtype)
    logits[1, 3, 7] = 1e4  # one position all but certain, another with a −inf logit
    logits[2, 2, :5] = float("-inf")
    labels = torch.randint(0, 1000, (3, 17), generator=g)
    labels[0, :5] = -100  # not scored
    labels[2, -1] = -100
    flat = labels.reshape(-1)
    whole = nn.functional.cross_entropy(logits.float().reshape(-1, 1000), flat, reduction="none")[flat != -100]
    assert whole.numel() == 51 - 6
    for rows in (1, 4, 7, 50, 51, 100):
        assert torch.equal(perplexity.token_nll(logits, labels, rows), whole), rows
    monkeypatch.setattr(perplexity, "CHUNK_ELEMENTS", 3000)  # the default chunk: 3 positions
    assert torch.equal(perplexity.token_nll(logits, labels), whole)
    assert perplexity.token_nll(logits, torch.full_like(labels, -100)).numel() == 0
