"""The block pipeline on encoders and vision transformers (llm.prune with forward=): the blocks of a
BERT encoder, a Hugging Face ViT, a torchvision ViT (nn.Sequential of blocks with nn.MultiheadAttention)
and a timm ViT are found; every Linear is pruned to its exact count; nn.MultiheadAttention's packed
in_proj_weight is pruned as its three projections, never skipped; an attention that cannot be unpacked
is refused with the model unchanged."""

import copy

import pytest
import torch
from torch import nn

from pyprune_fast import llm, masks, modeling

transformers = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    return transformers.BertModel(config).eval()


def bert_batches(count=3):
    g = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(0, 64, (2, 7), generator=g), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
        for _ in range(count)
    ]


def call_with_dict(model, inputs):
    return model(**inputs)


def tiny_torchvision_vit():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return tv.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    ).eval()


def image_batches(count=2, size=16):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(2, 3, size, size, generator=g) for _ in range(count)]


def call(model, inputs):
    return model(inputs)


def exact_counts(model, fraction, granularity="layer"):
    """Every Linear of every block (q/k/v of a packed attention as three) pruned to its exact count."""
    with modeling.unpacked_attention(model):
        _, blocks = llm.find_blocks(model)
        for block in blocks:
            for name, lin in llm.block_linears(block).items():
                w = lin.weight
                want = (
                    round(fraction * w.shape[1]) * w.shape[0] if granularity == "row" else round(fraction * w.numel())
                )
                assert int((w == 0).sum()) == want, name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "snip"])
def test_a_bert_encoder_is_pruned_block_by_block(method):
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    result = llm.prune(model, bert_batches(), method=method, sparsity=0.5, forward=call_with_dict, progress=False)
    prefix, blocks = llm.find_blocks(model)
    assert prefix == "encoder.layer" and len(result.layer_sparsity) == 2 * 6
    exact_counts(model, 0.5, llm.METHODS[method].granularity)
    after = model.state_dict()
    pruned = set(result.layer_sparsity)
    for name, value in before.items():  # everything outside the blocks' Linear weights is untouched
        if name not in pruned:
            assert torch.equal(after[name], value), name
    data = llm.METHODS[method].needs_data
    assert ("calibration 3 batches" if data else "no calibration data") in result.summary()


def test_magnitude_on_an_encoder_equals_layerwise_masks():
    model = tiny_bert()
    expected = {}
    for i, block in enumerate(llm.find_blocks(model)[1]):
        for n, lin in llm.block_linears(block).items():
            expected[f"encoder.layer.{i}.{n}.weight"] = masks.layerwise({n: lin.weight.detach().abs()}, 0.3)[n]
    llm.prune(model, method="magnitude", sparsity=0.3, progress=False)
    params = dict(model.named_parameters())
    for name, keep in expected.items():
        assert torch.equal(params[name] != 0, keep), name


def test_a_torchvision_vit_prunes_its_packed_attention_as_three_projections():
    model = tiny_torchvision_vit()
    prefix, blocks = llm.find_blocks(model)
    assert prefix == "encoder.layers" and isinstance(blocks, nn.Sequential)
    result = llm.prune(model, image_batches(), method="wanda", sparsity=0.5, forward=call, progress=False)
    names = {n.split(".", 3)[-1] for n in result.layer_sparsity}
    assert {"self_attention.q_proj.weight", "self_attention.v_proj.weight", "self_attention.out_proj.weight"} <= names
    for block in blocks:  # the real module is back, its packed weight pruned per row of each projection
        attention = block.self_attention
        assert isinstance(attention, nn.MultiheadAttention)
        e = attention.embed_dim
        for third in attention.in_proj_weight.detach().split(e):
            assert int((third == 0).sum()) == e * (e // 2)
        assert int((attention.out_proj.weight == 0).sum()) == e * (e // 2)


def test_unpacked_attention_computes_what_multihead_attention_computes():
    model = tiny_torchvision_vit()
    x = image_batches(1)[0]
    with torch.no_grad():
        dense = model(x)
        with modeling.unpacked_attention(model):
            assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
            unpacked = model(x)
            attention = model.encoder.layers[0].self_attention
            tokens = torch.randn(2, 5, 16)
            out, weights = attention(tokens, tokens, tokens)  # need_weights=True: head-averaged weights
        reference, reference_weights = model.encoder.layers[0].self_attention(tokens, tokens, tokens)
    torch.testing.assert_close(unpacked, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, reference_weights, rtol=1e-5, atol=1e-6)


def test_an_attention_that_cannot_be_unpacked_is_refused_with_the_model_unchanged():
    class CrossBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([CrossBlock(), CrossBlock()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    net = Net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"blocks\.0\.attention: an nn.MultiheadAttention with separate kdim/vdim"):
        llm.prune(net, [torch.randn(2, 3, 8)], method="wanda", forward=call, progress=False)
    assert isinstance(net.blocks[0].attention, nn.MultiheadAttention)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_a_hugging_face_vit_is_pruned_block_by_block():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.ViTModel(config).eval()

    def forward(m, pixels):
        return m(pixel_values=pixels)

    llm.prune(model, image_batches(), method="sparsegpt", sparsity="2:4", forward=forward, progress=False)
    for block in llm.find_blocks(model)[1]:
        for name, lin in llm.block_linears(block).items():
            groups = (lin.weight.detach().reshape(-1, 4) != 0).sum(1)
            assert bool((groups <= 2).all()), name


def test_a_timm_vit_is_pruned_block_by_block():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, num_classes=3
    ).eval()
    result = llm.prune(model, image_batches(), method="wanda", sparsity=0.5, forward=call, progress=False)
    assert llm.find_blocks(model)[0] == "blocks" and len(result.layer_sparsity) == 2 * 4
    exact_counts(model, 0.5, "row")


def test_forward_needs_a_list_of_batches():
    with pytest.raises(TypeError, match="with forward=, calibration must be a list of batches"):
        llm.prune(tiny_bert(), torch.zeros(4, 7, dtype=torch.long), forward=call_with_dict, progress=False)
    with pytest.raises(ValueError, match="calibration holds no batches"):
        llm.prune(tiny_bert(), [], forward=call_with_dict, progress=False)
