"""save_pretrained → from_pretrained round trip of a pruned model and its tokenizer, written atomically."""

import pytest
import torch

from pyprune_fast import llm
from tests.test_llm_models import VOCAB, tiny_causal_lm, tiny_tokenizer

transformers = pytest.importorskip("transformers")


def pruned(arch="llama"):
    model = tiny_causal_lm(arch)
    calibration = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(3))
    llm.prune(model, calibration, method="sparsegpt", sparsity="2:4", num_samples=4, seq_len=16, progress=False)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_round_trip(tmp_path, arch):
    model, tokenizer = pruned(arch), tiny_tokenizer()
    path = llm.save_pretrained(model, tokenizer, tmp_path / "sparsegpt-2:4")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded) is type(model)
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok("w1 w5 w7")["input_ids"] == tokenizer("w1 w5 w7")["input_ids"]
    assert [p.name for p in tmp_path.iterdir()] == ["sparsegpt-2:4"]


def test_existing_directory_needs_overwrite(tmp_path):
    model = tiny_causal_lm("llama")
    path = tmp_path / "out"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        llm.save_pretrained(model, None, path)
    assert (path / "old.txt").read_text() == "old"
    llm.save_pretrained(model, None, path, overwrite=True)
    assert not (path / "old.txt").exists() and (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


class BrokenTokenizer:
    def save_pretrained(self, directory):
        raise OSError("disk full")


def test_nothing_half_written_on_failure(tmp_path):
    model = tiny_causal_lm("llama")
    with pytest.raises(OSError, match="disk full"):
        llm.save_pretrained(model, BrokenTokenizer(), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    llm.save_pretrained(model, None, kept)
    before = sorted(p.name for p in kept.iterdir())
    with pytest.raises(OSError, match="disk full"):
        llm.save_pretrained(model, BrokenTokenizer(), kept, overwrite=True)
    assert sorted(p.name for p in kept.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_refuses_a_plain_module(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        llm.save_pretrained(torch.nn.Linear(2, 2), None, tmp_path / "x")


def test_causal_lm_directories_are_detected_from_their_config(tmp_path):
    model = pruned("opt")
    llm.save_pretrained(model, tiny_tokenizer(), tmp_path / "opt")
    llm.save_pretrained(tiny_causal_lm("qwen2"), None, tmp_path / "bare")
    encoder = transformers.BertModel(
        transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    encoder.save_pretrained(tmp_path / "bert")
    assert llm.is_causal_lm(tmp_path / "opt") and llm.is_causal_lm(tmp_path / "bare")
    assert not llm.is_causal_lm(tmp_path / "bert")
    loaded, tokenizer = llm.load_causal_lm(tmp_path / "opt")
    assert not loaded.training and tokenizer is not None
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert llm.load_causal_lm(tmp_path / "bare")[1] is None
    with pytest.raises(ValueError, match="does not hold a causal LM"):
        llm.load_causal_lm(tmp_path / "bert")
