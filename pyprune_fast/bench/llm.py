"""The LLM pipeline (pyprune_fast.llm) against what users run today: the SparseGPT solve of one Linear
against a straightforward PyTorch transcription of the published algorithm, Wanda's metric and per-row
selection against its published loop, and the time to prune one LLaMA-7B-shaped decoder block.

Shapes at scale 1 are LLaMA-7B's (hidden 4096, MLP 11008, 32 heads); `scale` shrinks them, columns
rounded to multiples of 4 (2:4), the hidden size of a block to multiples of 128 (one head of 128)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import masks
from ..criteria.wanda import wanda_score
from ..llm import sparsegpt
from ..llm.sparsity import parse_sparsity
from .harness import Case

# Weight shapes [out, in] of the 7 Linear layers of one LLaMA-7B decoder block: q, k, v, o, gate, up, down.
LLAMA7B_BLOCK = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}


def _scaled(n: int, scale: float, multiple: int = 4) -> int:
    """n × scale rounded to a multiple of `multiple` (at least one multiple)."""
    return max(multiple, round(n * scale / multiple) * multiple)


def random_hessian(cols: int, tokens: int = 1024, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """H = 2XᵀX/n of n random calibration inputs X [n, cols] (with a per-feature scale, as real activations
    have), as the pipeline accumulates it for one Linear."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g, dtype=dtype) * torch.rand(cols, generator=g, dtype=dtype).add_(0.1)
    return (2.0 / tokens) * (x.T @ x)


def straightforward_sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float = 0.5,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) as it is first written in plain PyTorch, without
    the lazy batched updates: dampened H, U = chol(H⁻¹) (upper), then for each column i the mask of its
    block of `blocksize` columns (unstructured: the lowest saliency w²/U_cc² of the block, exactly
    round(s·rows·c1) − round(s·rows·c0) entries jointly, ties by the lower flat index) or of its group of m
    columns (N:M: the n highest of each row kept), the error e = (w_:i − q) / U_ii and the immediate
    update of every remaining column, W_:,i: −= e · U_i,i: (one in-place rank-1 update per column).
    Returns the pruned weight (float32, or float64 for a float64 weight) and its keep-mask."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(dtype).clone()
    rows, cols = w.shape
    h = hessian.detach().to(dtype).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True)
    d = torch.diag(u)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for c0 in range(0, cols, blocksize):
        c1 = min(c0 + blocksize, cols)
        if m is None:
            saliency = (w[:, c0:c1] / d[c0:c1]) ** 2
            count = round(sparsity * rows * c1) - round(sparsity * rows * c0)
            order = torch.argsort(saliency.flatten(), stable=True)
            block = torch.zeros(saliency.numel(), dtype=torch.bool)
            block[order[:count]] = True
            pruned[:, c0:c1] = block.view(rows, c1 - c0)
        for i in range(c0, c1):
            if m is not None and (i - c0) % m == 0:
                saliency = (w[:, i : i + m] / d[i : i + m]) ** 2
                lowest = torch.topk(saliency, m - n, dim=1, largest=False).indices
                pruned[:, i : i + m].scatter_(1, lowest, True)
            q = w[:, i].masked_fill(pruned[:, i], 0.0)
            err = (w[:, i] - q) / u[i, i]
            w[:, i:].addr_(err, u[i, i:], alpha=-1.0)
            w[:, i] = q
    w[pruned] = 0.0
    return w, ~pruned


def ours_sparsegpt(weight: Tensor, hessian: Tensor, sparsity: float | str = 0.5, blocksize: int = 128):
    """The project's solve as the pipeline runs it: llm.sparsegpt.inverse_factor, then prune_ (per-layer
    granularity, lazy column blocks) on a copy of the weight. Returns the pruned weight and its keep-mask."""
    w = weight.clone()
    keep = sparsegpt.prune_(w, sparsegpt.inverse_factor(hessian), parse_sparsity(sparsity), blocksize=blocksize)
    return w, keep


def check_sparsegpt(rows: int = 48, cols: int = 320, dtype: torch.dtype = torch.float64) -> None:
    """Ours and the straightforward solve give the same masks and (to float tolerance) the same weights,
    unstructured 50 % and 2:4, on a small case (three column blocks, the last one partial)."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(rows, cols, generator=g, dtype=dtype)
    hessian = random_hessian(cols, tokens=2 * cols, seed=2, dtype=dtype)
    for sparsity, nm in ((0.5, {}), ("2:4", {"n": 2, "m": 4})):
        w_ours, keep_ours = ours_sparsegpt(weight, hessian, sparsity)
        w_base, keep_base = straightforward_sparsegpt(weight, hessian, 0.5, **nm)
        assert torch.equal(keep_ours, keep_base), f"SparseGPT {sparsity}: masks differ"
        torch.testing.assert_close(w_ours, w_base, rtol=1e-9, atol=1e-9, msg=f"SparseGPT {sparsity}: weights differ")


def sparsegpt_case(
    rows: int, cols: int, sparsity: str = "50%", device: str = "cpu", scale: float = 1.0, tokens: int = 1024
) -> Case:
    """The SparseGPT solve of one Linear [rows, cols] (sizes at scale 1) with H from `tokens` random
    calibration inputs: ours vs the straightforward transcription, unstructured "50%" or "2:4"."""
    rows, cols = _scaled(rows, scale), _scaled(cols, scale)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=g).to(device)
    hessian = random_hessian(cols, tokens, seed=1).to(device)
    nm = {"n": 2, "m": 4} if sparsity == "2:4" else {}
    ours_sparsity = "2:4" if nm else 0.5
    return Case(
        group=f"SparseGPT solve {rows}x{cols} {sparsity} {device}",
        ours=lambda: ours_sparsegpt(weight, hessian, ours_sparsity),
        baselines={"straightforward SparseGPT": lambda: straightforward_sparsegpt(weight, hessian, 0.5, **nm)},
        elements=rows * cols,
    )


def published_wanda(
    weights: dict[str, Tensor], row_stats: dict[str, Tensor], sparsity: float = 0.5
) -> dict[str, Tensor]:
    """Wanda's published loop (Sun et al. 2024), one layer at a time: metric = |W| · sqrt(row statistic
    ‖X_j‖²) broadcast over rows, a stable sort of each row, the first int(cols × sparsity) indices
    scattered into the prune mask. Returns keep-masks (True = kept)."""
    out = {}
    for name, w in weights.items():
        metric = torch.abs(w) * torch.sqrt(row_stats[name].reshape(1, -1))
        prune = torch.zeros_like(metric, dtype=torch.bool)
        indices = torch.sort(metric, dim=-1, stable=True)[1][:, : int(w.shape[1] * sparsity)]
        prune.scatter_(1, indices, True)
        out[name] = ~prune
    return out


def ours_wanda(weights: dict[str, Tensor], norms: dict[str, Tensor], sparsity: float = 0.5) -> dict[str, Tensor]:
    """The pipeline's Wanda step: criteria.wanda.wanda_score, then the fused per-row selection
    (masks.per_row), one Linear at a time as llm.prune does. Returns keep-masks."""
    out = {}
    for name, w in weights.items():
        out.update(masks.per_row({name: wanda_score(w, norms[name].unsqueeze(0))}, sparsity))
    return out


def llama_block_weights(scale: float = 1.0, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Random weights of the 7 Linears of a LLaMA-7B block (each dimension × scale, multiples of 4) and
    random input norms ‖X_j‖₂ for each."""
    g = torch.Generator().manual_seed(0)
    weights, norms = {}, {}
    for name, (rows, cols) in LLAMA7B_BLOCK.items():
        rows, cols = _scaled(rows, scale), _scaled(cols, scale)
        weights[name] = torch.randn(rows, cols, generator=g).to(device)
        norms[name] = torch.rand(cols, generator=g).mul_(10).to(device)
    return weights, norms


def wanda_case(device: str = "cpu", sparsity: float = 0.5, scale: float = 1.0) -> Case:
    """Wanda's metric and per-row selection on the 7 Linears of one LLaMA-7B-shaped block: ours vs the
    published loop."""
    weights, norms = llama_block_weights(scale, device)
    row_stats = {name: v.pow(2) for name, v in norms.items()}  # ‖X_j‖², the statistic Wanda's loop stores
    n = sum(w.numel() for w in weights.values())
    return Case(
        group=f"Wanda metric + per-row masks, LLaMA-7B block x{scale:g} ({n / 1e6:.0f}M) {device}",
        ours=lambda: ours_wanda(weights, norms, sparsity),
        baselines={"published Wanda loop (sort + scatter)": lambda: published_wanda(weights, row_stats, sparsity)},
        elements=n,
        bytes_moved=n * 5,
    )


def llama_block_model(scale: float = 1.0, device: str = "cpu") -> nn.Module:
    """A one-block LlamaForCausalLM shaped like LLaMA-7B's decoder block (hidden 4096, MLP 11008, 32 heads
    of 128; vocabulary 256), random weights; scale shrinks the hidden size (multiples of 128, heads of 128
    kept) and the MLP (multiples of 4)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden = _scaled(4096, scale, 128)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=_scaled(11008, scale),
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        num_hidden_layers=1,
        vocab_size=256,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def calibration_ids(num_samples: int = 4, seq_len: int = 256, vocab: int = 256) -> Tensor:
    return torch.randint(0, vocab, (num_samples, seq_len), generator=torch.Generator().manual_seed(0))


class BlockPruning:
    """Pruning one LLaMA-7B-shaped block with llm.prune; `restore()` puts the dense weights back (not
    part of the timed prune)."""

    def __init__(self, scale: float = 1.0, device: str = "cpu", num_samples: int = 4, seq_len: int = 256):
        self.model = llama_block_model(scale, device)
        self.dense = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.ids = calibration_ids(num_samples, seq_len, self.model.config.vocab_size)
        self.num_samples, self.seq_len, self.device = num_samples, seq_len, device

    def restore(self) -> None:
        self.model.load_state_dict(self.dense)

    def prune(self, method: str, sparsity: float | str):
        from .. import llm

        return llm.prune(
            self.model, self.ids, method=method, sparsity=sparsity, num_samples=self.num_samples,
            seq_len=self.seq_len, device=self.device, progress=False,
        )  # fmt: skip

    @torch.no_grad()
    def prune_straightforward(self, sparsity: float = 0.5) -> None:
        """What a user writes today for SparseGPT on this block: forward hooks summing H = XᵀX of every
        Linear's inputs over the calibration, then `straightforward_sparsegpt` on each Linear."""
        block = self.model.model.layers[0]
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        hessians = {n: torch.zeros(m.in_features, m.in_features, device=self.device) for n, m in linears.items()}

        def hook(name):
            def add(_module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                hessians[name].addmm_(x.t(), x)

            return add

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
        try:
            self.model(self.ids.to(self.device))
        finally:
            for h in handles:
                h.remove()
        for name, module in linears.items():
            pruned, _ = straightforward_sparsegpt(
                module.weight.detach().float(), 2 * hessians[name] / self.ids.numel(), sparsity
            )
            module.weight.copy_(pruned.to(module.weight.dtype))


def block_case(method: str = "sparsegpt", sparsity: float | str = 0.5, device: str = "cpu", scale: float = 1.0) -> Case:
    """Time to prune one LLaMA-7B-shaped block with llm.prune (4 × 256 calibration tokens) against the
    hooks + straightforward SparseGPT loop users write today (SparseGPT at 50 % only); each call first
    restores the dense weights (a copy, small next to the prune)."""
    job = BlockPruning(scale, device)

    def run():
        job.restore()
        return job.prune(method, sparsity)

    def straightforward():
        job.restore()
        job.prune_straightforward(0.5)

    baselines = (
        {"hooks + straightforward SparseGPT": straightforward} if (method, sparsity) == ("sparsegpt", 0.5) else {}
    )
    n = sum(p.numel() for p in job.model.model.layers.parameters())
    return Case(
        group=f"llm.prune {method} {sparsity} one LLaMA-7B block x{scale:g} {device}",
        ours=run,
        baselines=baselines,
        elements=n,
    )
