"""`--data` / `--eval-data`: the user's image folders and text files through `prune` and `score`, the
batches and token windows checked against the files, the metrics recomputed by hand, and every bad
input one clear line."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from pyprune_fast import criteria, llm
from pyprune_fast.app import cli, data, zoo
from pyprune_fast.io import load_masks
from tests.models import TinyViT

CLASSES = {"cat": (220, 30, 30), "dog": (30, 220, 30), "owl": (30, 30, 220)}  # a color per class
TINY_VIT = "tests.test_cli_data:tiny_vit"


def tiny_vit() -> zoo.Bundle:
    """A factory model taking 8 × 8 images, 5 classes, no preprocessing of its own (the default's)."""
    torch.manual_seed(0)
    return zoo.Bundle(name="tiny-vit", model=TinyViT(image=8, classes=5).eval(), input_shape=(3, 8, 8))


def write_images(root, per_class=4, classes=CLASSES, seed=0):
    """Images of slightly varying size and shade, each class its own color, written with PIL."""
    g = torch.Generator().manual_seed(seed)
    for name, color in classes.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            shade = [min(255, c + int(torch.randint(0, 30, (1,), generator=g))) for c in color]
            Image.new("RGB", (10 + 3 * i, 9 + 2 * i), tuple(shade)).save(root / name / f"{i}.png")
    return str(root)


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "train"), write_images(tmp_path / "val", per_class=3, seed=1)


def by_hand_preprocess(path):
    """The documented default preprocessing, with torchvision's transforms."""
    transforms = pytest.importorskip("torchvision.transforms")
    pipeline = transforms.Compose(
        [
            transforms.Resize(9),  # int(8 / 0.875)
            transforms.CenterCrop(8),
            transforms.ToTensor(),
            transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
        ]
    )
    with Image.open(path) as image:
        return pipeline(image.convert("RGB"))


def class_of(image: torch.Tensor) -> int:
    """The class whose color an (un-normalized) image has: its brightest channel."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    return int((image * std + mean).mean((1, 2)).argmax())


def folder_batches(root):
    """Every image of a folder with its label, read by hand: (images, labels)."""
    files = [(os.path.join(root, c, f), i) for i, c in enumerate(sorted(CLASSES)) for f in sorted(os.listdir(root / c))]
    return torch.stack([by_hand_preprocess(p) for p, _ in files]), torch.tensor([label for _, label in files])


def test_the_folder_is_read_as_imagefolder_and_batches_come_from_it(images):
    train, _ = images
    folder = data.image_folder(train, "--data")
    assert folder.classes == ["cat", "dog", "owl"] and len(folder.samples) == 12
    torchvision = pytest.importorskip("torchvision")
    assert folder.samples == torchvision.datasets.ImageFolder(train).samples
    bundle = zoo.load(TINY_VIT)
    data.use_files(bundle, train, None, batches=2, batch_size=5, seq_len=8)
    assert [len(labels) for _, labels in bundle.calibration] == [5, 5]  # the first 2 batches of 5
    assert bundle.loss_fn is F.cross_entropy and "default" in bundle.info["preprocessing"]
    seen = set()
    for batch, labels in bundle.calibration:
        assert batch.shape[1:] == (3, 8, 8)
        assert [class_of(x) for x in batch] == labels.tolist()  # each label is its image's class folder
        for x in batch:
            match = [p for p, _ in folder.samples if torch.allclose(by_hand_preprocess(p), x, atol=1e-6)]
            assert match
            seen.add(match[0])
    assert len(seen) == 10 and len({class_of(x) for b, _ in bundle.calibration for x in b}) == 3  # classes mixed


def test_prune_with_image_folders_reports_accuracy_recomputed_by_hand(images, tmp_path, capsys):
    train, val = images
    out = tmp_path / "out"
    argv = ["prune", "--model", TINY_VIT, "--data", train, "--eval-data", val, "--criterion", "snip", "magnitude"]
    assert cli.main([*argv, "--sparsity", "0.5", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "--data 12 images of 3 classes" in stdout and "top1_acc" in stdout
    doc = json.load(open(out / "report.json"))
    inputs, labels = folder_batches(tmp_path / "val")
    model = tiny_vit().model
    with torch.no_grad():
        dense = model(inputs).argmax(1)
    assert doc["dense"]["top1_acc"] == pytest.approx((dense == labels).double().mean().item())
    assert doc["dense"]["top1_agreement"] == 1.0
    for result in doc["results"]:
        masks = load_masks(str(out / result["files"]["masks"]))
        pruned = tiny_vit().model
        params = dict(pruned.named_parameters())
        with torch.no_grad():
            for name, keep in masks.items():
                params[name].mul_(keep)
            preds = pruned(inputs).argmax(1)
        assert result["metrics"]["top1_acc"] == pytest.approx((preds == labels).double().mean().item())
        assert result["metrics"]["top1_agreement"] == pytest.approx((preds == dense).double().mean().item())


def test_score_with_an_image_folder_matches_the_criterion_on_the_same_images(images, tmp_path):
    train, _ = images
    out = tmp_path / "scores"
    argv = ["score", "--model", TINY_VIT, "--data", train, "--criterion", "snip", "--batch-size", "16"]
    assert cli.main([*argv, "--out", str(out), "--quiet"]) == 0
    saved = load_file(str(out / "scores-snip.safetensors"))
    expected = criteria.snip(tiny_vit().model, [folder_batches(tmp_path / "train")], loss_fn=F.cross_entropy)
    assert saved.keys() == expected.keys()
    for name in expected:  # one batch of all 12 images: the same loss whatever their order
        torch.testing.assert_close(saved[name], expected[name], rtol=1e-4, atol=1e-7)


def test_a_torchvision_model_reads_the_folder_with_its_weights_transforms(images, tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # nothing cached: random init
    train, val = images
    out = tmp_path / "out"
    argv = ["prune", "--model", "torchvision:squeezenet1_1", "--data", train, "--eval-data", val, "--batches", "1"]
    assert cli.main([*argv, "--criterion", "snip", "--sparsity", "0.5", "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "SqueezeNet1_1_Weights.IMAGENET1K_V1's transforms (the weights themselves are not loaded)" in stdout
    doc = json.load(open(out / "report.json"))
    assert set(doc["dense"]) == {"top1_acc", "top1_agreement"} and doc["dense"]["top1_agreement"] == 1.0


# --- text -----------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from tests.test_llm_models import tiny_causal_lm, tiny_tokenizer  # noqa: E402


def write_text(root):
    """A folder with a .txt file, a .jsonl file and an ignored .md file, in the tiny tokenizer's words."""
    os.makedirs(root / "sub")
    (root / "a.txt").write_text(" ".join(f"w{1 + i % 90}" for i in range(300)))
    (root / "sub" / "b.jsonl").write_text(
        "\n".join(
            json.dumps({"text": " ".join(f"w{1 + (i * 7 + j) % 90}" for j in range(20)), "id": i}) for i in range(5)
        )
    )
    (root / "notes.md").write_text("w1 w2 w3")
    return str(root)


def tokens_by_hand(tokenizer, root) -> torch.Tensor:
    """The folder's documents in sorted path order (a.txt, then sub/b.jsonl's lines), tokenized one by one."""
    documents = [open(os.path.join(root, "a.txt")).read()]
    documents += [json.loads(line)["text"] for line in open(os.path.join(root, "sub", "b.jsonl"))]
    return torch.tensor([i for d in documents for i in tokenizer(d, add_special_tokens=False)["input_ids"]])


@pytest.fixture(scope="module")
def causal_lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny-llama"
    llm.save_pretrained(tiny_causal_lm("llama"), tiny_tokenizer(), path)
    return str(path)


def test_symbolic_link_loops_and_repeats_read_each_file_once(tmp_path, capsys):
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.txt").write_text("alpha")
    (texts / "sub" / "b.txt").write_text("beta")
    os.symlink("..", texts / "sub" / "loop")  # back to texts/: a loop
    os.symlink("a.txt", texts / "same.txt")  # the same file again
    assert data.read_texts(str(texts), "--data") == ["alpha", "beta"]
    assert "--data" in capsys.readouterr().err
    images = tmp_path / "images"
    write_images(images, per_class=2)
    os.symlink("..", images / "cat" / "up")  # the whole folder again, below a class folder
    folder = data.image_folder(str(images), "--data")
    assert len(folder.samples) == 2 * len(CLASSES)
    assert "symbolic link" in capsys.readouterr().err


def test_text_folder_tokens_are_the_files_tokens(tmp_path):
    root = write_text(tmp_path / "text")
    tokenizer = tiny_tokenizer()
    assert data.read_texts(root, "--data")[0].startswith("w1 w2")
    assert torch.equal(data.text_tokens(root, "--data", tokenizer), tokens_by_hand(tokenizer, root))
    assert len(data.read_texts(str(tmp_path / "text" / "sub" / "b.jsonl"), "--data")) == 5


def test_prune_a_causal_lm_on_text_files(causal_lm_dir, tmp_path, capsys):
    root = write_text(tmp_path / "text")
    evaluation = tmp_path / "held-out.txt"
    evaluation.write_text(" ".join(f"w{1 + (i * 11) % 90}" for i in range(150)))
    out = tmp_path / "out"
    argv = ["prune", "--model", f"hf:{causal_lm_dir}", "--data", root, "--eval-data", str(evaluation)]
    argv += ["--criterion", "wanda", "--sparsity", "0.5", "--samples", "4", "--seq-len", "32", "--out", str(out)]
    assert cli.main([*argv, "--quiet"]) == 0
    assert f"calibration: --data {root!r} (400 tokens)" in capsys.readouterr().out
    doc = json.load(open(out / "report.json"))
    model, tokenizer = tiny_causal_lm("llama"), tiny_tokenizer()
    held_out = torch.tensor(tokenizer(evaluation.read_text(), add_special_tokens=False)["input_ids"])
    assert doc["dense"]["perplexity"] == pytest.approx(llm.perplexity(model, held_out, seq_len=32), rel=1e-5)
    llm.prune(model, tokens_by_hand(tokenizer, root), method="wanda", sparsity=0.5, num_samples=4, seq_len=32)
    pruned = llm.perplexity(model, held_out, seq_len=32)
    assert doc["results"][0]["metrics"]["perplexity"] == pytest.approx(pruned, rel=1e-5)


def test_too_little_text_for_the_calibration_is_one_line(causal_lm_dir, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("w1 w2 w3 w4 w5")
    argv = ["prune", "--model", f"hf:{causal_lm_dir}", "--data", str(tmp_path / "short.txt"), "--samples", "2"]
    assert cli.main([*argv, "--seq-len", "16", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "calibration has 5 tokens (--data" in err
    assert "but --samples × --seq-len = 2 × 16 = 32 are needed" in err


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_score_and_prune_a_hugging_face_encoder_on_text(encoder_dir, tmp_path):
    root = write_text(tmp_path / "text")
    out = tmp_path / "scores"
    argv = ["score", "--model", f"hf:{encoder_dir}", "--data", root, "--criterion", "feature_l1", "wanda"]
    assert cli.main([*argv, "--seq-len", "16", "--batch-size", "8", "--batches", "2", "--out", str(out)]) == 0
    model = transformers.BertModel.from_pretrained(encoder_dir).eval()
    windows = tokens_by_hand(tiny_tokenizer(), root)[: 25 * 16].view(25, 16)[:16]
    batches = [({"input_ids": w, "attention_mask": torch.ones_like(w)}, None) for w in windows.split(8)]
    for name in ("feature_l1", "wanda"):
        expected = criteria.CRITERIA[name](model, batches, forward=data.hidden_states)
        saved = load_file(str(out / f"scores-{name}.safetensors"))
        assert saved.keys() == expected.keys()
        assert all(torch.allclose(saved[n], expected[n], rtol=1e-4, atol=1e-6) for n in expected)
    argv = ["prune", "--model", f"hf:{encoder_dir}", "--eval-data", root, "--criterion", "magnitude", "--seq-len", "16"]
    assert cli.main([*argv, "--sparsity", "0.5", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    doc = json.load(open(tmp_path / "out" / "report.json"))
    assert doc["dense"] == {"output_cosine": pytest.approx(1.0)} and doc["results"][0]["metrics"]["output_cosine"] < 1


# --- bad inputs: one line each ------------------------------------------------------------------


def bad_cases(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "six", classes={f"c{i}": (10 * i, 0, 0) for i in range(6)})
    write_images(tmp_path / "two", classes={"cat": (220, 30, 30), "dog": (30, 220, 30)})
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "no-images" / "cat")
    (tmp_path / "no-images" / "cat" / "readme.txt").write_text("not an image")
    write_images(tmp_path / "broken")
    (tmp_path / "broken" / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (tmp_path / "notes.txt").write_text("w1 w2")
    (tmp_path / "bad.jsonl").write_text('{"text": "w1 w2"}\n{"body": "w3"}\n')
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    return tmp_path


IMAGE_ERRORS = [
    (["--data", "{t}/nowhere"], "--data '{t}/nowhere': no such file or directory"),
    (["--eval-data", "{t}/nowhere"], "--eval-data '{t}/nowhere': no such file or directory"),
    (["--data", "{t}/notes.txt"], "is a file; image models read a folder with one subfolder of images per class"),
    (["--data", "{t}/empty"], "has no class subfolders: expected {t}/empty/<class>/<image>"),
    (["--data", "{t}/no-images"], "class folders ['cat'] hold no image"),
    (["--data", "{t}/broken"], "cannot read image '{t}/broken/dog/9.png'"),
    (["--data", "{t}/six"], "has 6 class folders but model 'tiny-vit' has 5 outputs"),
    (["--data", "{t}/train", "--eval-data", "{t}/two"], "has classes ['cat', 'dog'] but --data '{t}/train' has"),
]


@pytest.mark.parametrize("extra, message", IMAGE_ERRORS)
def test_bad_image_data_is_one_clear_line(tmp_path, capsys, extra, message):
    t = str(bad_cases(tmp_path))
    argv = ["prune", "--model", TINY_VIT, *[e.format(t=t) for e in extra], "--criterion", "snip"]
    assert cli.main([*argv, "--out", str(tmp_path / "new" / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyprune-fast: error: ") and err.count("\n") == 1, err
    assert message.format(t=t) in err
    assert not (tmp_path / "new").exists()


TEXT_ERRORS = [
    (["--data", "{t}/empty"], "--data '{t}/empty' holds no .txt or .jsonl file"),
    (["--data", "{t}/bad.jsonl"], "line 2: expected a JSON object with a string 'text' field, got keys ['body']"),
    (["--eval-data", "{t}/latin1.txt"], "--eval-data: '{t}/latin1.txt' is not UTF-8 text"),
]


@pytest.mark.parametrize("extra, message", TEXT_ERRORS)
def test_bad_text_data_is_one_clear_line(causal_lm_dir, tmp_path, capsys, extra, message):
    t = str(bad_cases(tmp_path))
    argv = ["prune", "--model", f"hf:{causal_lm_dir}", *[e.format(t=t) for e in extra]]
    assert cli.main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyprune-fast: error: ") and err.count("\n") == 1, err
    assert message.format(t=t) in err


def test_data_does_not_apply_to_the_default_model_or_a_bare_module(tmp_path, capsys):
    write_images(tmp_path / "train")
    assert cli.main(["score", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "o")]) == 2
    assert "--data do not apply to the default model" in capsys.readouterr().err
    argv = ["score", "--model", "tests.cli_factory:bare", "--data", str(tmp_path / "train")]
    assert cli.main([*argv, "--criterion", "snip", "--out", str(tmp_path / "o")]) == 2
    assert "takes neither an image folder" in capsys.readouterr().err


def test_missing_torchvision_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("No module named 'torchvision'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(zoo.ModelSpecError, match=r"pip install 'pyprune-fast\[vision\]'"):
        zoo.load("torchvision:resnet18")
