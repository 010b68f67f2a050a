"""The user's own data for the CLI (`--data PATH` calibrates, `--eval-data PATH` evaluates).

Image models (torchvision:, timm:, a factory Bundle with a (3, H, W) input_shape) read an image folder
as torchvision's ImageFolder does: one subfolder per class, the classes sorted by name are labels
0, 1, ..., the images (IMAGE_EXTENSIONS, any depth below their class folder) read with PIL and
preprocessed as the model expects (the Bundle's `preprocess`: torchvision weights' transforms, timm's
data config, or `default_preprocess`). Calibration batches are (images, labels) of a fixed random
order of the folder's images, so that each batch mixes classes; the loss is cross-entropy against the
labels. Evaluation: top-1 accuracy against the labels, and top-1 agreement with the dense model.

Language models read text: a file (`.jsonl`: one JSON object a line, its "text" field; any other
name: UTF-8 text, one document) or a folder of `.txt` and `.jsonl` files (any depth, in sorted path
order). Causal LMs get one token stream (llm_runner); other Hugging Face models windows of `seq_len`
tokens in batches, evaluated by how close their outputs stay to the dense model's.

Every problem with the files is a DataError (a UsageError): one line naming the option, the path and
what was expected."""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError

# As torchvision.datasets.folder.IMG_EXTENSIONS (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEXT_EXTENSIONS = (".txt", ".jsonl")
JSONL_FIELD = "text"  # the one field read from each JSON line
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_FRACTION = 0.875  # resize the shorter side to size / 0.875, then center-crop size (224 ← 256)
EVAL_CACHE_BYTES = 2 << 30  # preprocessed evaluation images are kept in memory up to this size, else re-read


class DataError(UsageError):
    """A --data / --eval-data path that cannot be used, said in one line (a UsageError: exit status 2)."""


def check_path(path: str, option: str) -> None:
    """DataError unless `path` exists (checked before the model loads)."""
    if not os.path.exists(path):
        raise DataError(f"{option} {path!r}: no such file or directory")


# --- images ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """PIL image → float tensor [3, H, W], and what it does in words (for the report)."""

    fn: Callable[[object], Tensor]
    description: str

    def __call__(self, image) -> Tensor:
        return self.fn(image)


def default_preprocess(size: tuple[int, int], why: str = "") -> Preprocess:
    """The documented default when a model has no preprocessing of its own: resize the shorter side to
    int(min(H, W) / 0.875) (PIL bilinear), center-crop `size` (H, W), scale to [0, 1] and normalize with
    ImageNet's mean and std: torchvision's Resize, CenterCrop, ToTensor, Normalize on PIL images,
    written with PIL and torch only."""
    import numpy as np
    from PIL import Image

    h, w = size
    short = int(min(h, w) / DEFAULT_CROP_FRACTION)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def run(image) -> Tensor:
        iw, ih = image.size  # sizes rounded as torchvision's Resize(short) and CenterCrop((h, w)) round them
        rw, rh = (short, int(short * ih / iw)) if iw <= ih else (int(short * iw / ih), short)
        image = image.resize((rw, rh), Image.Resampling.BILINEAR)
        if rw < w or rh < h:
            image = image.resize((max(rw, w), max(rh, h)), Image.Resampling.BILINEAR)
            rw, rh = image.size
        left, top = int(round((rw - w) / 2.0)), int(round((rh - h) / 2.0))
        image = image.crop((left, top, left + w, top + h))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        return (x - mean) / std

    note = f" ({why})" if why else ""
    return Preprocess(
        run, f"default: shorter side to {short}, center crop {h}x{w}, ImageNet mean/std normalization{note}"
    )


@dataclass
class ImageFolder:
    """An image folder as torchvision's ImageFolder reads it: (path, label) of every image, classes sorted."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]

    def describe(self) -> str:
        return f"{len(self.samples)} images of {len(self.classes)} classes from {self.root}"


def image_folder(path: str, option: str) -> ImageFolder:
    """The images of `path` (one subfolder per class); DataError for a file, a folder without class
    subfolders, or class folders without images."""
    check_path(path, option)
    if not os.path.isdir(path):
        raise DataError(
            f"{option} {path!r} is a file; image models read a folder with one subfolder of images per class "
            f"({path}/<class>/<image>, as torchvision's ImageFolder)"
        )
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"{option} {path!r} has no class subfolders: expected {path}/<class>/<image> (as torchvision's ImageFolder)"
        )
    samples, empty, walk = [], [], _Walk(option)
    walk.visit(path)  # a link back to the top folder is a loop, not a class's images
    for label, name in enumerate(classes):
        found = walk.files(os.path.join(path, name), IMAGE_EXTENSIONS, hidden=True)
        if not found:
            empty.append(name)
        samples += [(f, label) for f in found]
    if empty:
        raise DataError(
            f"{option} {path!r}: class folders {empty} hold no image (extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    walk.note()
    return ImageFolder(path, classes, samples)


class _Walk:
    """The files below folders, symbolic links followed, each folder and each file read once (by device
    and inode): a link back into a folder already walked (a loop) or to a file already found is skipped,
    and `note` says on stderr how many were."""

    def __init__(self, option: str) -> None:
        self.option, self.seen, self.skipped = option, set(), 0

    def visit(self, path: str) -> bool:
        """Marks `path` read; whether it was not already (True for a broken link: its reader says so)."""
        try:
            info = os.stat(path)
        except OSError:
            return True
        key = (info.st_dev, info.st_ino)
        if key in self.seen:
            self.skipped += 1
            return False
        self.seen.add(key)
        return True

    def files(self, root: str, extensions: tuple[str, ...], hidden: bool) -> list[str]:
        """The files below `root` whose names end in `extensions` (any depth, sorted; folders starting
        with "." skipped unless `hidden`)."""
        found = []
        if not self.visit(root):
            return found
        for directory, subdirs, names in os.walk(root, followlinks=True):
            shown = [d for d in sorted(subdirs) if hidden or not d.startswith(".")]
            subdirs[:] = [d for d in shown if self.visit(os.path.join(directory, d))]
            for name in sorted(names):
                file = os.path.join(directory, name)
                if name.lower().endswith(extensions) and self.visit(file):
                    found.append(file)
        return found

    def note(self) -> None:
        if self.skipped:
            print(
                f"{self.option}: skipped {self.skipped} folders or files reached again through symbolic links (each "
                "is read once)",
                file=sys.stderr,
            )


def read_image(path: str, preprocess: Preprocess, option: str) -> Tensor:
    """One image, RGB, preprocessed; DataError naming the file when PIL cannot read it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return preprocess(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{option}: cannot read image {path!r}: {exc}") from exc


def image_batches(
    samples: list[tuple[str, int]], preprocess: Preprocess, batch_size: int, option: str
) -> Iterator[tuple[Tensor, Tensor]]:
    """(images [B, 3, H, W], labels [B] int64) of consecutive samples, read as they are asked for."""
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images = torch.stack([read_image(p, preprocess, option) for p, _ in chunk])
        yield images, torch.tensor([label for _, label in chunk], dtype=torch.long)


def _outputs(model: nn.Module, forward, inputs) -> Tensor:
    out = forward(model, inputs) if forward is not None else model(inputs)
    if not isinstance(out, Tensor):
        out = getattr(out, "logits", None)
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise DataError(
            "image folders give class labels: the model's outputs must be logits [batch, classes], got "
            f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
        )
    return out


def _check_classes(folder: ImageFolder, outputs: int, option: str, model: str) -> None:
    if len(folder.classes) > outputs:
        raise DataError(
            f"{option} {folder.root!r} has {len(folder.classes)} class folders but model {model!r} has {outputs} "
            f"outputs: its labels (the class folders in sorted order: 0..{len(folder.classes) - 1}) must be output "
            "indices of the model"
        )


class ImageEvaluation:
    """top1_acc (against the folder's labels) and top1_agreement (with the dense model's top-1) on every
    image of an evaluation folder. The preprocessed images stay in memory when they fit in
    EVAL_CACHE_BYTES, else they are read again for each evaluation."""

    def __init__(self, bundle, folder: ImageFolder, preprocess: Preprocess, batch_size: int, option: str) -> None:
        self.bundle, self.folder, self.preprocess, self.option = bundle, folder, preprocess, option
        self.batch_size = batch_size
        first = read_image(folder.samples[0][0], preprocess, option)
        self.cached = first.numel() * first.element_size() * len(folder.samples) <= EVAL_CACHE_BYTES
        self.batches = list(self._read()) if self.cached else None
        self.dense = self._predictions(bundle.model)

    def _read(self):
        return image_batches(self.folder.samples, self.preprocess, self.batch_size, self.option)

    @torch.no_grad()
    def _predictions(self, model: nn.Module) -> Tensor:
        device = next(model.parameters()).device
        preds = []
        for images, _ in self.batches if self.cached else self._read():
            out = _outputs(model, self.bundle.forward, images.to(device))
            _check_classes(self.folder, out.shape[-1], self.option, self.bundle.name)
            preds.append(out.argmax(-1).cpu())
        return torch.cat(preds)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        preds = self._predictions(model)
        labels = torch.tensor([label for _, label in self.folder.samples])
        return {
            "top1_acc": (preds == labels).double().mean().item(),
            "top1_agreement": (preds == self.dense).double().mean().item(),
        }


def use_image_folders(
    bundle, data: str | None, eval_data: str | None, batches: int, batch_size: int, seed: int = 0
) -> None:
    """Gives an image-model Bundle calibration batches from the folder `data` (the first batches ×
    batch_size images of a fixed random order, with their labels and cross-entropy) and/or the
    evaluation of the folder `eval_data` (ImageEvaluation); records both in bundle.info."""
    preprocess = bundle.preprocess
    if data is not None:
        folder = image_folder(data, "--data")
        order = list(folder.samples)
        random.Random(seed).shuffle(order)
        device = next(bundle.model.parameters()).device
        calibration = [
            (images.to(device), labels.to(device))
            for images, labels in image_batches(order[: batches * batch_size], preprocess, batch_size, "--data")
        ]
        with torch.no_grad():
            outputs = _outputs(bundle.model, bundle.forward, calibration[0][0][:1])
        _check_classes(folder, outputs.shape[-1], "--data", bundle.name)
        bundle.calibration, bundle.loss_fn = calibration, F.cross_entropy
        used = sum(len(labels) for _, labels in calibration)
        bundle.info["data"] = (
            f"--data {folder.describe()}: {len(calibration)} batches of up to {batch_size} "
            f"({used} images, classes mixed); loss: cross-entropy against the class-folder labels"
        )
    if eval_data is not None:
        folder = image_folder(eval_data, "--eval-data")
        if data is not None:
            calibration_classes = image_folder(data, "--data").classes
            if folder.classes != calibration_classes:
                raise DataError(
                    f"--eval-data {eval_data!r} has classes {_short(folder.classes)} but --data {data!r} has "
                    f"{_short(calibration_classes)}: both folders need the same class subfolders (their sorted "
                    "names are the labels)"
                )
        bundle.evaluate = ImageEvaluation(bundle, folder, preprocess, batch_size, "--eval-data")
        bundle.info["evaluation"] = (
            f"--eval-data {folder.describe()}: top-1 accuracy against the class-folder labels, top-1 agreement "
            "with the dense model"
        )
    bundle.info["preprocessing"] = preprocess.description


def _short(names: list[str], limit: int = 6) -> str:
    return str(names) if len(names) <= limit else f"[{', '.join(map(repr, names[:limit]))}, ... ({len(names)})]"


# --- text -----------------------------------------------------------------------------------------


def read_texts(path: str, option: str) -> list[str]:
    """The documents of a text file, a .jsonl file (each line's "text") or a folder of .txt/.jsonl
    files (any depth, sorted); DataError for a folder without such files, text that is not UTF-8, a
    JSON line without a string "text" field, or no text at all."""
    check_path(path, option)
    if os.path.isdir(path):
        walk = _Walk(option)
        files = walk.files(path, TEXT_EXTENSIONS, hidden=False)
        walk.note()
        if not files:
            raise DataError(f"{option} {path!r} holds no {' or '.join(TEXT_EXTENSIONS)} file")
    else:
        files = [path]
    documents = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise DataError(f"{option}: {file!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except OSError as exc:
            raise DataError(f"{option}: cannot read {file!r}: {exc.strerror or exc}") from exc
        documents += _jsonl_texts(text, file, option) if file.lower().endswith(".jsonl") else [text]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DataError(f"{option} {path!r} holds no text")
    return documents


def _jsonl_texts(text: str, file: str, option: str) -> list[str]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{option}: {file!r} line {number} is not JSON ({exc})") from exc
        value = record.get(JSONL_FIELD) if isinstance(record, dict) else None
        if not isinstance(value, str):
            got = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{option}: {file!r} line {number}: expected a JSON object with a string {JSONL_FIELD!r} field, "
                f"got {got}"
            )
        out.append(value)
    return out


def token_stream(documents: list[str], tokenizer) -> Tensor:
    """The documents tokenized (no special tokens) and concatenated into one 1-D int64 stream, the
    tokenizer's end-of-sequence token between documents when it has one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, document in enumerate(documents):
        if i and eos is not None:
            ids.append(int(eos))
        ids += tokenizer(document, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def text_tokens(path: str, option: str, tokenizer) -> Tensor:
    """The token stream of the text at `path` (read_texts, token_stream)."""
    return token_stream(read_texts(path, option), tokenizer)


def _encoder_inputs(windows: Tensor, device) -> dict[str, Tensor]:
    return {"input_ids": windows.to(device), "attention_mask": torch.ones_like(windows, device=device)}


def hidden_states(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """A Hugging Face encoder's output as one tensor: last_hidden_state (or logits, or the first output)."""
    out = model(**inputs)
    for name in ("last_hidden_state", "logits"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    return out[0] if isinstance(out, tuple) else out


def _text_windows(path: str, option: str, tokenizer, seq_len: int, needed: int) -> Tensor:
    tokens = text_tokens(path, option, tokenizer)
    if tokens.numel() < needed:
        raise DataError(
            f"{option} {path!r}: {tokens.numel()} tokens found, {needed} needed (at least one sequence of "
            f"--seq-len {seq_len}): give more text or a smaller --seq-len"
        )
    rows = tokens.numel() // seq_len
    return tokens[: rows * seq_len].view(rows, seq_len)


def use_text(bundle, data: str | None, eval_data: str | None, batches: int, batch_size: int, seq_len: int) -> None:
    """Gives a Hugging Face (non-causal) model Bundle with a tokenizer calibration batches from the
    text `data` (consecutive windows of `seq_len` tokens, `batch_size` a batch, the first `batches`;
    outputs: the last hidden state, no loss) and/or the evaluation of `eval_data` (output_cosine: mean
    cosine of each token's output with the dense model's)."""
    limit = getattr(getattr(bundle.model, "config", None), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DataError(f"--seq-len {seq_len} is longer than model {bundle.name!r} takes ({limit} positions)")
    device = next(bundle.model.parameters()).device
    bundle.forward = hidden_states
    if data is not None:
        windows = _text_windows(data, "--data", bundle.tokenizer, seq_len, seq_len)[: batches * batch_size]
        bundle.calibration = [
            (_encoder_inputs(windows[i : i + batch_size], device), None) for i in range(0, len(windows), batch_size)
        ]
        bundle.info["data"] = (
            f"--data {data}: {len(windows)} windows of {seq_len} tokens in {len(bundle.calibration)} batches "
            "(no loss: criteria that need data but no loss)"
        )
    if eval_data is not None:
        windows = _text_windows(eval_data, "--eval-data", bundle.tokenizer, seq_len, seq_len)
        inputs = [_encoder_inputs(windows[i : i + batch_size], device) for i in range(0, len(windows), batch_size)]

        @torch.no_grad()
        def outputs(model: nn.Module) -> list[Tensor]:
            return [hidden_states(model, x).float() for x in inputs]

        reference = outputs(bundle.model)

        def evaluate(model: nn.Module) -> dict[str, float]:
            cos = [F.cosine_similarity(o, r, dim=-1).flatten() for o, r in zip(outputs(model), reference)]
            return {"output_cosine": torch.cat(cos).mean().item()}

        bundle.evaluate = evaluate
        bundle.info["evaluation"] = (
            f"--eval-data {eval_data}: {len(windows)} windows of {seq_len} tokens; output_cosine: mean cosine of "
            "each token's output with the dense model's"
        )


# --- which reader a model takes ------------------------------------------------------------------


def use_files(bundle, data: str | None, eval_data: str | None, *, batches: int, batch_size: int, seq_len: int) -> None:
    """Puts the files in place of the bundle's data, read as its `data_kind` says: image folders
    (use_image_folders; a (3, H, W) input_shape without preprocessing gets default_preprocess) or text
    (use_text). DataError for a model that takes neither."""
    kind = bundle.data_kind
    shape = bundle.input_shape
    if kind is None and shape is not None and len(shape) == 3 and shape[0] == 3:
        kind = "images"
    elif kind is None and bundle.tokenizer is not None:
        kind = "text"
    options = " and ".join(o for o, p in (("--data", data), ("--eval-data", eval_data)) if p is not None)
    if kind == "images":
        if bundle.preprocess is None:
            if shape is None or len(shape) != 3:
                raise DataError(f"{options}: model {bundle.name!r} names no image size (input_shape (3, H, W))")
            bundle.preprocess = default_preprocess(tuple(shape[1:]), "the model names no preprocessing of its own")
        use_image_folders(bundle, data, eval_data, batches, batch_size)
    elif kind == "text":
        use_text(bundle, data, eval_data, batches, batch_size, seq_len)
    else:
        raise DataError(
            f"{options}: model {bundle.name!r} takes neither an image folder (it has no (3, H, W) input_shape) nor "
            "text (it has no tokenizer); a package.module:factory can return a Bundle with its own calibration "
            "batches and evaluation"
        )
