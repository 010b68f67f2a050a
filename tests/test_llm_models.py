"""Tiny random causal LMs of each architecture (built here, no download), block discovery, the packaged
text and calibration windows, and the embedded SmolLM2 (skipped when its wheel is not installed)."""

import pytest
import torch
from torch import nn

from pyprune_fast import llm

transformers = pytest.importorskip("transformers")

VOCAB = 96
ARCHS = ("llama", "mistral", "qwen2", "gpt_neox", "opt")
BLOCKS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}


def tiny_config(arch: str):
    """2 decoder blocks, hidden 32, MLP 64, 4 heads (2 key/value heads where the architecture has GQA)."""
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    common["max_position_embeddings"] = 64
    if arch in ("llama", "mistral", "qwen2"):
        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[arch]
        return cls(**common, intermediate_size=64, num_key_value_heads=2)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, intermediate_size=64)
    return transformers.OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=32)


def tiny_causal_lm(arch: str = "llama", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def tiny_tokenizer():
    """A word-level fast tokenizer over VOCAB tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def save_tiny_llama(directory) -> str:
    """A tiny random Llama and its tokenizer saved under `directory` as a Hugging Face model (hf:PATH)."""
    path = directory / "tiny-llama"
    llm.save_pretrained(tiny_causal_lm("llama"), tiny_tokenizer(), path)
    return str(path)


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every Linear of every decoder block, by parameter name (detached, not copied)."""
    prefix, blocks = llm.find_blocks(model)
    return {
        f"{prefix}.{i}.{n}.weight": lin.weight.detach()
        for i, block in enumerate(blocks)
        for n, lin in llm.block_linears(block).items()
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_are_found_generically(arch):
    model = tiny_causal_lm(arch)
    name, blocks = llm.find_blocks(model)
    assert name == BLOCKS[arch]
    assert len(blocks) == 2 and blocks is model.get_submodule(name)
    linears = llm.block_linears(blocks[0])
    assert linears and all(isinstance(m, nn.Linear) for m in linears.values())
    assert model.get_output_embeddings() not in linears.values()


def test_a_model_without_decoder_blocks_is_refused():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    with pytest.raises(ValueError, match="found no decoder blocks"):
        llm.find_blocks(model)
    with pytest.raises(TypeError, match="nn.Module"):
        llm.find_blocks("model")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_first_block_inputs_keep_every_keyword(arch):
    model = tiny_causal_lm(arch)
    _, blocks = llm.find_blocks(model)
    ids = torch.randint(0, VOCAB, (4, 8))
    seen = []
    handle = blocks[0].register_forward_pre_hook(lambda _m, a, k: seen.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(ids[:2], use_cache=False)
    handle.remove()
    inputs = llm.capture_inputs(model, blocks[0], ids.split(2), torch.device("cpu"))
    assert len(inputs) == 2 and inputs.hidden[0].shape == (2, 8, 32)
    assert set(inputs.kwargs[0]) == set(seen[0][1]) - {"hidden_states"}
    shared = [k for k, v in inputs.kwargs[1].items() if isinstance(v, (torch.Tensor, tuple))]
    assert shared and all(inputs.kwargs[1][k] is inputs.kwargs[0][k] for k in shared)
    expected = blocks[0](*seen[0][0], **seen[0][1])
    torch.testing.assert_close(inputs.run(blocks[0], 0), expected[0] if isinstance(expected, tuple) else expected)


def test_calibration_windows():
    stream = torch.arange(100)
    windows = llm.calibration_windows(stream, 3, 10)
    assert torch.equal(windows, torch.arange(30).view(3, 10))
    assert torch.equal(
        llm.calibration_windows(torch.arange(60).view(4, 15), 2, 10), torch.arange(60).view(4, 15)[:2, :10]
    )
    with pytest.raises(ValueError, match="fewer than num_samples × seq_len"):
        llm.calibration_windows(stream, 11, 10)
    with pytest.raises(ValueError, match="fewer than the 5 sequences"):
        llm.calibration_windows(torch.zeros(4, 15, dtype=torch.long), 5, 10)
    with pytest.raises(TypeError, match="integer tensor"):
        llm.calibration_windows(torch.zeros(100), 1, 10)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        llm.calibration_windows(stream, 1, 0)


def test_pydoc_text_parts_are_disjoint_and_real():
    calibration, evaluation = llm.pydoc_text("calibration"), llm.pydoc_text("evaluation")
    assert len(calibration) > 2 * len(evaluation) > 50_000
    held_out = set(evaluation.split("\n\n"))
    assert len(held_out) > 400 and not held_out & set(calibration.split("\n\n"))
    assert 'The "assert" statement' in evaluation and 'The "assert" statement' not in calibration
    with pytest.raises(ValueError, match="split must be one of"):
        llm.pydoc_text("train")


def _smollm2_or_skip():
    try:
        llm.smollm2_gguf()
    except ImportError as exc:
        pytest.skip(str(exc))
    pytest.importorskip("gguf")


def test_smollm2_wanda_beats_magnitude_on_held_out_text():
    """The embedded SmolLM2-135M: a Llama with GQA and 30 blocks; at 50 % a calibrated Wanda keeps the
    held-out perplexity far below magnitude's (first load converts the GGUF: ~40 s, then cached)."""
    _smollm2_or_skip()
    model, tokenizer = llm.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    calibration = llm.pydoc_tokens(tokenizer, "calibration")
    evaluation = llm.pydoc_tokens(tokenizer, "evaluation")[:513]

    def ppl(m):
        return llm.perplexity(m, evaluation, seq_len=128, batch_size=4, progress=False)

    dense = ppl(model)
    llm.prune(model, method="magnitude", sparsity=0.5, progress=False)
    magnitude = ppl(model)
    model, _ = llm.load_smollm2()
    result = llm.prune(model, calibration, method="wanda", num_samples=8, seq_len=128, progress=False)
    wanda = ppl(model)
    assert len(result.layer_sparsity) == 30 * 7
    assert all(s == 0.5 for s in result.layer_sparsity.values())
    assert dense < wanda < 0.5 * magnitude, (dense, wanda, magnitude)


class KeywordBlock(nn.Module):
    """Called with hidden_states as a keyword and an extra tensor argument; returns a tuple."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, *, hidden_states, gate):
        return (hidden_states + self.down(torch.relu(self.up(hidden_states))) * gate, None)


class KeywordLM(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.stack = nn.ModuleList([KeywordBlock(dim) for _ in range(2)])
        self.head = nn.Linear(dim, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        h = self.embed(input_ids)
        gate = torch.sigmoid(h.mean(-1, keepdim=True))
        for block in self.stack:
            h = block(hidden_states=h, gate=gate)[0]
        return self.head(h)


def test_a_custom_model_with_keyword_hidden_states_is_pruned_sequentially():
    torch.manual_seed(0)
    model = KeywordLM()
    name, blocks = llm.find_blocks(model)
    assert name == "stack"
    ids = torch.randint(0, VOCAB, (3, 5))
    inputs = llm.capture_inputs(model, blocks[0], ids.split(1), torch.device("cpu"))
    assert inputs.by_keyword and set(inputs.kwargs[0]) == {"gate"}
    result = llm.prune(model, ids, method="wanda", sparsity=0.5, num_samples=3, seq_len=5, progress=False)
    assert set(result.layer_sparsity) == {f"stack.{i}.{n}.weight" for i in range(2) for n in ("up", "down")}
    assert all(s == 0.5 for s in result.layer_sparsity.values())
    assert int((model.head.weight == 0).sum()) == 0
