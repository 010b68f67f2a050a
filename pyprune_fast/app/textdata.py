"""Real English text that ships with Python itself: the reference topics of `pydoc_data`
(the text behind `help('assert')`, ...). Nobody on this project wrote it, and it is on every
machine that has Python, so the default model can be calibrated and evaluated offline."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Passage:
    topic: str
    first: str
    second: str


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose: no code (indented) lines, headings or grammar rules."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
            continue
        if any(set(ln.strip()) <= set("*=-~^") for ln in lines):
            continue
        paragraph = " ".join(ln.strip() for ln in lines)
        if "::=" not in paragraph:
            out.append(paragraph)
    return out


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", paragraph) if s.strip()]


def passages(min_words: int = 6, max_words: int = 48) -> list[Passage]:
    """Every prose paragraph with at least two sentences, split into a first and a second half at a
    sentence boundary (each half at least `min_words` words, cut to `max_words`), in topic order."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        for paragraph in _prose_paragraphs(topics[topic]):
            sents = _sentences(paragraph)
            if len(sents) < 2:
                continue
            cut = max(1, len(sents) // 2)
            first, second = " ".join(sents[:cut]), " ".join(sents[cut:])
            if len(first.split()) < min_words or len(second.split()) < min_words:
                continue
            out.append(Passage(topic, " ".join(first.split()[:max_words]), " ".join(second.split()[:max_words])))
    return out


def split(held_out_every: int = 4, seed: int = 0) -> tuple[list[Passage], list[Passage]]:
    """(calibration, held-out) passages: every `held_out_every`-th topic is held out, so the two sets
    share no topic. The calibration passages come in a fixed random order (`seed`), so that any run of
    consecutive passages (a batch, the first N batches) mixes topics; the held-out ones in topic order."""
    import random

    items = passages()
    topics = sorted({p.topic for p in items})
    held = {t for i, t in enumerate(topics) if i % held_out_every == 0}
    calibration = [p for p in items if p.topic not in held]
    random.Random(seed).shuffle(calibration)
    return calibration, [p for p in items if p.topic in held]
