"""Width (and depth) pruning of encoders and vision transformers through llm.prune_structured with
forward=: BERT (bare and inside the default MiniLM's SentenceEncoder wrapper), Hugging Face ViT, timm ViT
(one packed qkv Linear) and torchvision ViT (nn.MultiheadAttention: MLP channels only). Exact widths,
heads removed whole, nothing changed at ratio 0, the refit against lstsq written out here, bad input
refused by name with the model unchanged, and the saved models loaded back."""

import copy

import pytest
import torch
from torch import nn

from pyprune_fast import llm
from pyprune_fast.app.zoo import SentenceEncoder
from pyprune_fast.llm.structured import load_vision, save_vision

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, MLP = 16, 4, 32
D = HIDDEN // HEADS


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=MLP
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def hf_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
    )
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def timm_vit(depth=2):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=HIDDEN, depth=depth, num_heads=HEADS, mlp_ratio=2, num_classes=3
    ).eval()


def torchvision_vit(layers=2):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return tv.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=layers, num_heads=HEADS, hidden_dim=HIDDEN, mlp_dim=MLP, num_classes=3
    ).eval()


def token_batches(count=3):
    g = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(0, 64, (2, 7), generator=g), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
        for _ in range(count)
    ]


def image_batches(count=3):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(2, 3, 16, 16, generator=g) for _ in range(count)]


def call(model, inputs):
    return model(inputs)


def call_bert(model, inputs):
    return model(**inputs).last_hidden_state


def call_vit(model, pixels):
    return model(pixel_values=pixels).last_hidden_state


BERT_NAMES = (
    "intermediate.dense",
    "output.dense",
    ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attention.output.dense",
)
HF_VIT_NAMES = ("mlp.fc1", "mlp.fc2", ("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.o_proj")

# name: (model factory, calibration, forward, (MLP producer, consumer, q/k/v (one name: packed), o))
CASES = {
    "bert": (bert, token_batches, call_bert, BERT_NAMES),
    "minilm_wrapper": (lambda: SentenceEncoder(bert()).eval(), token_batches, call, BERT_NAMES),
    "hf_vit": (hf_vit, image_batches, call_vit, HF_VIT_NAMES),
    "timm_vit": (timm_vit, image_batches, call, ("mlp.fc1", "mlp.fc2", ("attn.qkv",), "attn.proj")),
}


def blocks_of(model):
    return llm.find_blocks(model)[1]


def params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_width_removes_whole_heads_and_exact_channel_counts(name):
    make, data, forward, (fc1, fc2, qkv, o) = CASES[name]
    model = make()
    dense = copy.deepcopy(model)
    block_before = params(blocks_of(model)[0])
    ratio = 0.3
    result = llm.prune_structured(model, data(), forward=forward, ratio=ratio, progress=False)
    # the split written out: round(0.3 × 4) = 1 head per block (its q, k, v rows with biases and its o
    # columns), the MLP channels carrying the rest of the block's budget (fc1 row + bias, fc2 column)
    head_cost = 3 * D * (HIDDEN + 1) + D * HIDDEN
    channel_cost = HIDDEN + 1 + HIDDEN
    heads = round(ratio * HEADS)
    channels = round((ratio * block_before - heads * head_cost) / channel_cost)
    assert result.heads == [HEADS - heads] * 2 and result.intermediate == [MLP - channels] * 2
    for block, old in zip(blocks_of(model), blocks_of(dense)):
        assert params(block) == block_before - heads * head_cost - channels * channel_cost
        assert block.get_submodule(fc1).out_features == block.get_submodule(fc2).in_features == MLP - channels
        assert block.get_submodule(o).in_features == (HEADS - heads) * D
        # heads removed whole: the kept rows are, in every projection, those of the same kept heads
        if len(qkv) == 1:
            new_parts = block.get_submodule(qkv[0]).weight.reshape(3, -1, D, HIDDEN)
            old_parts = old.get_submodule(qkv[0]).weight.reshape(3, HEADS, D, HIDDEN)
        else:
            new_parts = torch.stack([block.get_submodule(n).weight.reshape(-1, D, HIDDEN) for n in qkv])
            old_parts = torch.stack([old.get_submodule(n).weight.reshape(HEADS, D, HIDDEN) for n in qkv])
        q_new, q_old = new_parts[0], old_parts[0]
        kept = [next(h for h in range(HEADS) if torch.equal(q, q_old[h])) for q in q_new]
        assert kept == sorted(kept)
        assert torch.equal(new_parts, old_parts[:, kept])
    with torch.no_grad():
        out = forward(model, data()[0])
    assert bool(torch.isfinite(out).all())


def test_torchvision_vit_loses_mlp_channels_only():
    model = torchvision_vit()
    block_before = params(blocks_of(model)[0])
    result = llm.prune_structured(model, image_batches(), forward=call, ratio=0.25, progress=False)
    channels = round(0.25 * block_before / (2 * HIDDEN + 1))
    assert result.intermediate == [MLP - channels] * 2 and result.heads == [HEADS] * 2
    for block in blocks_of(model):
        assert isinstance(block.self_attention, nn.MultiheadAttention)
        assert block.mlp[0].out_features == block.mlp[3].in_features == MLP - channels
    with torch.no_grad():
        assert model(image_batches()[0]).shape == (2, 3)


@pytest.mark.parametrize("name", list(CASES))
def test_ratio_zero_changes_nothing(name):
    make, data, forward, *_ = CASES[name]
    model = make()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        reference = forward(model, data()[0])
    llm.prune_structured(model, data(), forward=forward, ratio=0.0, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(forward(model, data()[0]), reference)


def test_the_mlp_refit_is_the_least_squares_solution():
    model = bert()
    dense = copy.deepcopy(model)
    seen = []
    handle = dense.encoder.layer[0].output.dense.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in token_batches():
            dense(**b)
    handle.remove()
    x = torch.cat([s.reshape(-1, MLP) for s in seen]).double()
    llm.prune_structured(
        model, token_batches(), forward=call_bert, ratio=0.3, units="mlp", percdamp=0.0, progress=False
    )
    old_fc1 = dense.encoder.layer[0].intermediate.dense.weight
    new_fc1 = model.encoder.layer[0].intermediate.dense.weight
    keep = [next(j for j in range(MLP) if torch.equal(row, old_fc1[j])) for row in new_fc1]
    old = dense.encoder.layer[0].output.dense
    target = x @ old.weight.double().T + old.bias.double()
    design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, target).solution.T  # [out, |K| + 1]
    new = model.encoder.layer[0].output.dense
    torch.testing.assert_close(new.weight.double(), solution[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new.bias.double(), solution[:, -1], rtol=1e-4, atol=1e-4)


def test_head_removal_on_multihead_attention_is_refused_by_name_with_the_model_unchanged():
    model = torchvision_vit()
    before = copy.deepcopy(model.state_dict())
    for units in ("both", "heads"):
        with pytest.raises(ValueError, match=r"units='\w+': architecture torchvision_vit: heads cannot be removed"):
            llm.prune_structured(model, image_batches(), forward=call, units=units, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.encoder.layers[0].mlp[0].out_features == MLP


def test_an_unknown_architecture_is_refused_by_name_with_the_model_unchanged():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    net = nn.Sequential(nn.Linear(8, 8), nn.Sequential(Block(), Block()))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="architecture Sequential: its attention is not known"):
        llm.prune_structured(net, [torch.randn(2, 8)], forward=call, progress=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="units must be one of"):
        llm.prune_structured(bert(), token_batches(), forward=call_bert, units="rows", progress=False)


def _outputs(model, forward, batch):
    with torch.no_grad():
        return forward(model, batch)


def test_bert_saves_as_a_standard_directory_with_mlp_widths_and_reloads_with_heads(tmp_path):
    model = bert()
    result = llm.prune_structured(model, token_batches(), forward=call_bert, ratio=0.25, units="mlp", progress=False)
    assert result.standard and model.config.intermediate_size == result.intermediate[0] < MLP
    llm.save_pretrained(model, None, tmp_path / "mlp")
    stock = transformers.BertModel.from_pretrained(tmp_path / "mlp").eval()
    batch = token_batches()[0]
    torch.testing.assert_close(_outputs(stock, call_bert, batch), _outputs(model, call_bert, batch))

    model = bert()
    result = llm.prune_structured(model, token_batches(), forward=call_bert, ratio=0.3, progress=False)
    assert not result.standard and model.config.num_attention_heads == HEADS  # BERT: head size = hidden / heads
    llm.save_pretrained(model, None, tmp_path / "heads")
    loaded, tokenizer = llm.load_pretrained(tmp_path / "heads")
    assert tokenizer is None and isinstance(loaded, transformers.BertModel)
    torch.testing.assert_close(_outputs(loaded, call_bert, batch), _outputs(model, call_bert, batch))


def test_hugging_face_vit_with_heads_removed_is_a_standard_directory(tmp_path):
    model = hf_vit()
    result = llm.prune_structured(model, image_batches(), forward=call_vit, ratio=0.3, progress=False)
    assert result.standard and model.config.num_attention_heads == HEADS - 1 and model.config.head_dim == D
    llm.save_pretrained(model, None, tmp_path / "vit")
    stock = transformers.ViTModel.from_pretrained(tmp_path / "vit").eval()
    batch = image_batches()[0]
    torch.testing.assert_close(_outputs(stock, call_vit, batch), _outputs(model, call_vit, batch))


@pytest.mark.parametrize("factory", [timm_vit, torchvision_vit])
@pytest.mark.parametrize("structure", ["width", "global", "depth"])
def test_vision_models_round_trip_through_safetensors(tmp_path, factory, structure):
    model = factory(depth=3) if factory is timm_vit else factory(layers=3)
    options = {"structure": "width", "allocation": "global"} if structure == "global" else {"structure": structure}
    result = llm.prune_structured(model, image_batches(), forward=call, ratio=0.3, progress=False, **options)
    assert not result.standard
    blocks = blocks_of(model)
    assert isinstance(blocks, nn.Sequential) and len(blocks) == (2 if structure == "depth" else 3)
    save_vision(model, tmp_path / "vit")
    assert sorted(p.name for p in (tmp_path / "vit").iterdir()) == ["model.safetensors"]
    fresh = factory(depth=3) if factory is timm_vit else factory(layers=3)
    loaded = load_vision(tmp_path / "vit", fresh)
    batch = image_batches()[0]
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in model.parameters()]
    torch.testing.assert_close(_outputs(loaded, call, batch), _outputs(model, call, batch))
    with pytest.raises(ValueError, match="holds a timm_vit model|holds a torchvision_vit model"):
        load_vision(tmp_path / "vit", torchvision_vit() if factory is timm_vit else timm_vit())


def test_depth_pruning_of_bert_updates_its_config():
    model = bert()
    batches = token_batches()
    result = llm.prune_structured(model, batches, forward=call_bert, structure="depth", ratio=0.5, progress=False)
    assert len(result.removed_blocks) == 1 and model.config.num_hidden_layers == 1
    assert len(model.encoder.layer) == 1 and result.standard
    assert _outputs(model, call_bert, token_batches()[0]).shape == (2, 7, HIDDEN)


def test_magnitude_scores_a_packed_qkv_head_by_its_rows_in_q_k_and_v():
    model = timm_vit()
    dense = copy.deepcopy(model)
    llm.prune_structured(
        model, image_batches(), forward=call, ratio=0.3, units="heads", score="magnitude", progress=False
    )
    for block, old in zip(model.blocks, dense.blocks):
        qkv = old.attn.qkv.weight.reshape(3, HEADS, D, HIDDEN)
        proj = old.attn.proj.weight.reshape(HIDDEN, HEADS, D)
        norms = (qkv.pow(2).sum((0, 2, 3)) + proj.pow(2).sum((0, 2))).sqrt()  # bias-free qkv (timm default)
        removed = HEADS - block.attn.num_heads
        expected = torch.argsort(norms, stable=True)[removed:].sort().values
        q_new = block.attn.qkv.weight.reshape(3, -1, D, HIDDEN)[0]
        kept = [next(h for h in range(HEADS) if torch.equal(q, qkv[0, h])) for q in q_new]
        assert removed >= 1 and kept == expected.tolist()
        assert block.attn.attn_dim == block.attn.num_heads * D == block.attn.proj.in_features


@pytest.mark.parametrize("score", ["l2", "taylor"])
@pytest.mark.parametrize("name", [*CASES, "torchvision_vit"])
def test_the_filter_and_gradient_scores_run_on_encoders(name, score):
    """The new scores on every encoder layout (packed qkv, wrappers, MLP channels only): the block-local
    gradient pass finds the consumers, and the pruned model gives finite outputs of the dense shape."""
    if name == "torchvision_vit":
        make, data, forward = torchvision_vit, image_batches, call
    else:
        make, data, forward, _ = CASES[name]
    model = make()
    batch = data()[0]
    dense_out = _outputs(copy.deepcopy(model), forward, batch)
    result = llm.prune_structured(model, data(), forward=forward, ratio=0.3, score=score, progress=False)
    out = _outputs(model, forward, batch)
    assert result.decoder_params_after < result.decoder_params_before
    assert out.shape == dense_out.shape and torch.isfinite(out).all()
