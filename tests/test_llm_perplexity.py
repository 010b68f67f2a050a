"""Perplexity against a direct computation: one window at a time, the model's own loss on the labels
of the tokens not yet scored (the classic sliding-window loop), for any stride and batch size."""

import math

import pytest
import torch

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
