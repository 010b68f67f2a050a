"""`pyprune-fast prune --structure width|depth` on tiny random models: a Llama (hf:PATH) saved as
directories that stock from_pretrained loads, with perplexity, speed and kept widths in the report and
--distill lowering the perplexity; a BERT sentence encoder and a timm / torchvision ViT (factories here);
every misuse refused with exit status 2 and one line naming the flag before anything loads."""

import json
import os

import pytest
import torch

from pyprune_fast import llm
from pyprune_fast.app import cli
from pyprune_fast.app.zoo import Bundle, SentenceEncoder, output_agreement

transformers = pytest.importorskip("transformers")
from tests.test_llm_models import save_tiny_llama, tiny_tokenizer  # noqa: E402

OPTIONS = ["--samples", "2", "--seq-len", "32", "--eval-tokens", "256", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llm"))


def read_report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def run_ok(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def test_width_at_two_ratios_saves_standard_directories_stock_transformers_loads(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["prune", "--model", f"hf:{model_dir}", "--structure", "width", "--ratio", "0.25", "0.5"]
    printed = run_ok([*argv, "--criterion", "wanda", "--out", out, "--save-model", *OPTIONS], capsys)
    assert "prefill tok/s" in printed and "decode tok/s" in printed
    doc = read_report(out)
    assert doc["structured"]["dense"] == {"intermediate": [64, 64], "heads": [4, 4]}
    assert [(r["criterion"], r["sparsity"]) for r in doc["results"]] == [("wanda", "0.25"), ("wanda", "0.5")]
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["perplexity.png", "widths.png"]
    evaluation = llm.pydoc_tokens(tiny_tokenizer(), "evaluation")[:256]
    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert doc["dense"]["perplexity"] == pytest.approx(llm.perplexity(dense, evaluation, seq_len=32, progress=False))
    for r, ratio in zip(doc["results"], (0.25, 0.5)):
        s = r["structured"]
        assert r["files"]["model"] == f"width-wanda-{ratio:g}" and s["standard"]
        assert s["params_before"] == sum(p.numel() for p in dense.parameters()) > s["params_after"]
        assert r["achieved_sparsity"] == pytest.approx(s["decoder_removed"]) and abs(s["decoder_removed"] - ratio) < 0.1
        assert all(s["speed"][k] > 0 for k in ("dense_prefill_tps", "prefill_tps", "dense_decode_tps", "decode_tps"))
        assert s["weights_read_ratio"] > 1
        pruned = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, r["files"]["model"]))
        assert sum(p.numel() for p in pruned.parameters()) == s["params_after"]
        assert [pruned.config.intermediate_size] * 2 == s["intermediate"]
        ppl = llm.perplexity(pruned, evaluation, seq_len=32, progress=False)
        assert r["metrics"]["perplexity"] == pytest.approx(ppl, rel=1e-5)
        ids = pruned.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert ids.shape == (1, 7)
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    kept = doc["results"][0]["structured"]
    assert "![widths](widths.png)" in md and "prefill tok/s dense → pruned" in md
    assert f"MLP {kept['intermediate'][0]}, heads {kept['heads'][0]}" in md


def test_depth_removes_blocks_and_distill_lowers_the_perplexity(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["prune", "--model", f"hf:{model_dir}", "--structure", "depth", "--ratio", "0.5", "--out", out]
    run_ok([*argv, "--save-model", "--distill", "8", "--distill-lr", "3e-3", "--batch-size", "2", *OPTIONS], capsys)
    doc = read_report(out)
    (r,) = doc["results"]
    assert r["criterion"] == "influence" and len(r["structured"]["removed_blocks"]) == 1
    assert doc["finetune"]["steps"] == 8 and r["finetuned"]["first_loss"] > r["finetuned"]["last_loss"]
    assert r["finetuned"]["metrics"]["perplexity"] < r["metrics"]["perplexity"]
    saved = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "depth-influence-0.5"))
    assert saved.config.num_hidden_layers == 1
    evaluation = llm.pydoc_tokens(tiny_tokenizer(), "evaluation")[:256]
    ppl = llm.perplexity(saved, evaluation, seq_len=32, progress=False)
    assert r["finetuned"]["metrics"]["perplexity"] == pytest.approx(ppl, rel=1e-5)  # the distilled model is saved


def test_depth_by_loss_removes_the_block_whose_removal_raises_the_loss_least(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["prune", "--model", f"hf:{model_dir}", "--structure", "depth", "--ratio", "0.5", "--out", out]
    run_ok([*argv, "--criterion", "influence", "loss", *OPTIONS], capsys)
    by_score = {r["criterion"]: r for r in read_report(out)["results"]}
    assert set(by_score) == {"influence", "loss"}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    windows = llm.calibration_windows(llm.pydoc_tokens(tiny_tokenizer(), "calibration"), 2, 32)
    with torch.no_grad():
        base = float(model(windows, labels=windows).loss)
        raised = []
        for i in range(len(model.model.layers)):
            layers = model.model.layers
            model.model.layers = torch.nn.ModuleList([b for j, b in enumerate(layers) if j != i])
            raised.append(float(model(windows, labels=windows).loss) - base)
            model.model.layers = layers
    assert by_score["influence"]["structured"]["removed_blocks"] == [0]  # influence and loss disagree here
    assert by_score["loss"]["structured"]["removed_blocks"] == [min(range(len(raised)), key=raised.__getitem__)]


def tiny_sentence_encoder() -> Bundle:
    """A random 2-layer BERT in the default model's SentenceEncoder, token batches, output agreement."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32
    )
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    model = SentenceEncoder(bert).eval()
    g = torch.Generator().manual_seed(1)
    batches = [
        {"input_ids": torch.randint(0, 64, (4, 9), generator=g), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
        for _ in range(3)
    ]
    held_out = batches[0]
    reference = model(held_out).detach()

    def cosine(m):
        return {"output_cosine": torch.nn.functional.cosine_similarity(m(held_out), reference).mean().item()}

    return Bundle(
        name="tiny-sentence-encoder",
        model=model,
        pretrained=bert,
        calibration=[(b, None) for b in batches],
        evaluate=cosine,
    )


def tiny_timm_vit() -> Bundle:
    """A random timm ViT (16×16 images, 3 blocks) without data: random calibration images."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=4, mlp_ratio=2, num_classes=3
    ).eval()
    inputs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    reference = model(inputs).detach()
    return Bundle(
        name="tiny-timm-vit",
        model=model,
        input_shape=(3, 16, 16),
        evaluate=lambda m: output_agreement(m, inputs, reference),
    )


def test_a_sentence_encoder_loses_heads_and_channels_and_saves_its_bert(tmp_path, capsys):
    out = str(tmp_path / "out")
    model = "tests.test_cli_structured:tiny_sentence_encoder"
    argv = ["prune", "--model", model, "--structure", "width", "--out", out, "--save-model", "--quiet"]
    printed = run_ok(argv, capsys)
    assert "items/s" in printed
    doc = read_report(out)
    (r,) = doc["results"]
    assert r["criterion"] == "flap" and 0 < r["metrics"]["output_cosine"] <= 1 + 1e-6
    assert r["structured"]["speed"]["items_per_s"] > 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["retention.png", "widths.png"]
    loaded, _ = llm.load_pretrained(os.path.join(out, "width-flap-0.25"))
    assert isinstance(loaded, transformers.BertModel)
    assert sum(p.numel() for p in loaded.parameters()) == r["structured"]["params_after"]


@pytest.mark.parametrize("structure", ["width", "depth"])
def test_a_timm_vit_without_data_is_pruned_on_random_images_and_saved_with_its_shapes(tmp_path, capsys, structure):
    pytest.importorskip("timm")
    from pyprune_fast.llm.structured import load_vision

    out = str(tmp_path / "out")
    model = "tests.test_cli_structured:tiny_timm_vit"
    argv = ["prune", "--model", model, "--structure", structure, "--ratio", "0.34", "--out", out, "--save-model"]
    run_ok([*argv, "--quiet", *(["--multiple", "8"] if structure == "width" else [])], capsys)
    doc = read_report(out)
    (r,) = doc["results"]
    assert "random images" in doc["model"]["calibration"]
    loaded = load_vision(os.path.join(out, r["files"]["model"]), tiny_timm_vit().model)
    assert sum(p.numel() for p in loaded.parameters()) == r["structured"]["params_after"]
    assert len(loaded.blocks) == (2 if structure == "depth" else 3)
    assert all(w % 8 == 0 for w in r["structured"]["intermediate"]) or structure == "depth"


def tiny_torchvision_vit() -> Bundle:
    """A random torchvision ViT (nn.MultiheadAttention: MLP channels only), no data, no evaluation."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=32, num_classes=3
    ).eval()
    return Bundle(name="tiny-torchvision-vit", model=model, input_shape=(3, 16, 16))


def test_a_torchvision_vit_loses_mlp_channels_only(tmp_path, capsys):
    out = str(tmp_path / "out")
    model = "tests.test_cli_structured:tiny_torchvision_vit"
    run_ok(["prune", "--model", model, "--structure", "width", "--out", out, "--quiet"], capsys)
    (r,) = read_report(out)["results"]
    assert r["structured"]["heads"] == [4, 4] and r["structured"]["intermediate"][0] < 32 and r["metrics"] == {}


def test_a_hugging_face_vit_directory_is_saved_as_a_standard_directory(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32
    )
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    out = str(tmp_path / "out")
    argv = ["prune", "--model", f"hf:{tmp_path / 'vit'}", "--structure", "width", "--ratio", "0.3"]
    run_ok([*argv, "--out", out, "--save-model", "--quiet"], capsys)
    (r,) = read_report(out)["results"]
    saved = transformers.ViTModel.from_pretrained(os.path.join(out, "width-flap-0.3"))
    assert saved.config.num_attention_heads == r["structured"]["heads"][0] < 4
    assert sum(p.numel() for p in saved.parameters()) == r["structured"]["params_after"]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--structure", "width", "--ratio", "1.0"], "--ratio"),
        (["--structure", "width", "--ratio", "0"], "--ratio"),
        (["--ratio", "0.25"], "--ratio"),
        (["--distill", "5"], "--distill"),
        (["--no-reconstruct"], "--reconstruct"),
        (["--structure", "depth", "--criterion", "wanda"], "--criterion"),
        (["--structure", "depth", "--criterion", "loss"], "--criterion"),
        (["--structure", "depth", "--allocation", "global"], "--allocation"),
        (["--structure", "depth", "--multiple", "64"], "--multiple"),
        (["--structure", "width", "--multiple", "0"], "--multiple"),
        (["--multiple", "64"], "--multiple"),
        (["--structure", "width", "--criterion", "snip"], "--criterion"),
        (["--structure", "width", "--sparsity", "0.5"], "--sparsity"),
        (["--structure", "width", "--granularity", "2:4"], "--granularity"),
        (["--structure", "width", "--finetune", "3"], "--finetune"),
        (["--structure", "width", "--distill", "3"], "--distill"),
    ],
)
def test_misuse_exits_2_with_one_line_naming_the_flag(argv, flag, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["prune", "--out", out, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyprune-fast: error:") and len(err.splitlines()) == 1 and flag in err
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--distill", "-1"], "--distill"),
        (["--distill", "2", "--distill-lr", "0"], "--distill-lr"),
        (["--samples", "0"], "--samples"),
    ],
)
def test_llm_misuse_exits_2_before_the_model_loads(argv, flag, model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["prune", "--model", f"hf:{model_dir}", "--structure", "width", "--out", out, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and not os.path.exists(out)


def test_structured_pruning_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["prune", "--structure", "width", "--out", str(tmp_path / "out")]) == 2
    assert "--structure" in capsys.readouterr().err


def test_a_saved_model_directory_the_user_wrote_is_never_replaced(model_dir, tmp_path, capsys):
    mine = tmp_path / "models" / "width-flap-0.25"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    argv = ["prune", "--model", f"hf:{model_dir}", "--structure", "width", "--save-model", str(tmp_path / "models")]
    assert cli.main([*argv, "--out", str(tmp_path / "out"), *OPTIONS]) == 2
    assert "--save-model" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "mine"
