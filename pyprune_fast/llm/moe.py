"""Mixture-of-experts layers of Hugging Face decoder blocks: where the router and the routed experts
are, each expert's Linears as 2-D views of the fused expert tensors, and the calibration of each expert
on the tokens its router sends to it.

Layout (transformers 5, checked against 5.25): the sparse-MoE module of a block has a router child
(`gate`, gpt-oss `router`) whose `weight` is [E, H] and whose forward returns (logits, top-k weights,
top-k indices), and an `experts` child holding every routed expert in 3-D parameters:

    architecture  MoE module  router  expert count key   experts' tensors (per expert e)        shared experts
    mixtral       mlp         gate    num_local_experts  gate_up_proj [E, 2I, H] (gate | up),   —
                                                         down_proj [E, H, I]
    qwen2_moe     mlp         gate    num_experts        as mixtral                             shared_expert
                                                                                                (+ shared_expert_gate)
    qwen3_moe     mlp         gate    num_experts        as mixtral                             —
    deepseek_v3   mlp         gate    n_routed_experts   as mixtral (moe_intermediate_size)     shared_experts
    olmoe         mlp         gate    num_experts        as mixtral                             —
    gpt_oss       mlp         router  num_local_experts  gate_up_proj [E, H, 2I] transposed,    —
                                                         gate/up interleaved, + biases;
                                                         down_proj [E, I, H]

`num_experts_per_tok` is the top-k of all six. The layout flags (`is_transposed`, `is_concatenated`,
`has_bias`, `has_gate`) are those transformers' `use_experts_implementation` sets on the experts module.
Qwen2/3-MoE (decoder_sparse_step, mlp_only_layers) and DeepSeek-V3 (first_k_dense_replace) mix MoE
blocks with dense ones: a block without an MoE module has no experts here.

Expert Linears: expert e of the MoE module `mlp` is exposed as three nn.Linear objects whose weights
are views of the 3-D tensors, named `mlp.experts.<e>.gate_proj`, `.up_proj`, `.down_proj` (out x in,
as a Linear's weight), so that every method of the block pipeline scores or prunes them as Linears and
writes into the fused tensors in place. Their biases (gpt-oss) are not pruned. The router and a shared
expert's gate are never pruned; shared experts are ordinary Linears that see every token.

Calibration (`Routing`): during the statistics pass the fused experts' forward is replaced by one that
sends each expert's routed tokens x_t through its Linear views, so that the statistics hooks see exactly
those tokens: gate_proj and up_proj share the statistics of {x_t : t routed to e}; down_proj observes
w_t·h_t, its input h_t = act(gate x_t) ⊙ (up x_t) scaled by the router weight w_t of the pair (t, e).
Scaling down_proj's input is exact for the MoE output, which is Σ_e w_t·W_down h_t = W_down (w_t h_t):
Wanda's ‖X_j‖, SparseGPT's XᵀX and the means of the "sums" statistic of down_proj are those of what the
layer output really receives; gate_proj and up_proj see their tokens unweighted (their error passes
through the nonlinearity). The expert's output is the stock forward's up to the order of floating-point
operations.

Experts that receive fewer than `min_expert_tokens` calibration tokens are reported
(`PruneResult.rare_experts`) and handled by `rare_experts`: "dense" (left as they are), "magnitude"
(pruned by |W| to the block's pattern, data-free) or "route" (the calibration tokens the router scores
highest for the expert, among those not routed to it, are forced through it, up to the threshold, with
router weight 1/top_k, for its statistics only: the layer output is not changed)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError

RARE_EXPERTS = ("dense", "magnitude", "route")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# the routers whose routing rule is known (expert removal must reproduce it), by model_type
ROUTERS = {
    "MixtralTopKRouter": "mixtral",
    "Qwen2MoeTopKRouter": "qwen2_moe",
    "Qwen3MoeTopKRouter": "qwen3_moe",
    "DeepseekV3TopkRouter": "deepseek_v3",
    "OlmoeTopKRouter": "olmoe",
    "GptOssTopKRouter": "gpt_oss",
}
# the config field of the routed experts' count, by model_type
COUNT_KEYS = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "deepseek_v3": "n_routed_experts",
    "olmoe": "num_experts",
    "gpt_oss": "num_local_experts",
}
TOP_K_KEY = "num_experts_per_tok"
_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts")
_SHARED_GATES = ("shared_expert_gate",)


@dataclass
class MoE:
    """One sparse-MoE module of a block: its path relative to the block, the module, its router (name
    and module) and its fused experts."""

    path: str
    module: nn.Module
    router_name: str
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def architecture(self) -> str | None:
        """The model_type of a known router (ROUTERS), else None."""
        return ROUTERS.get(type(self.router).__name__)

    def expert(self, e: int) -> str:
        """Expert e's name relative to the block (`mlp.experts.3`)."""
        return f"{self.path}.experts.{e}"

    def views(self, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """(gate, up, down) weights of expert e as 2-D views [out, in] of the fused tensors."""
        ex = self.experts
        gate_up, down = ex.gate_up_proj.detach()[e], ex.down_proj.detach()[e]
        if getattr(ex, "is_transposed", False):
            gate_up, down = gate_up.T, down.T
        inter = gate_up.shape[0] // 2
        if getattr(ex, "is_concatenated", True):
            return gate_up[:inter], gate_up[inter:], down
        return gate_up[0::2], gate_up[1::2], down

    def biases(self, e: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """(gate, up, down) biases of expert e (gpt-oss), None for bias-free experts."""
        ex = self.experts
        if not getattr(ex, "has_bias", False):
            return None
        gate_up, down = ex.gate_up_proj_bias[e], ex.down_proj_bias[e]
        inter = gate_up.shape[0] // 2
        if getattr(ex, "is_concatenated", True):
            return gate_up[:inter], gate_up[inter:], down
        return gate_up[0::2], gate_up[1::2], down


def _fused_experts(module: nn.Module) -> nn.Module | None:
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == 3 and down.dim() == 3:
        return experts
    return None


def find_moe(block: nn.Module) -> list[MoE]:
    """The sparse-MoE modules of a decoder block with fused (3-D) experts, in `named_modules()` order;
    [] for a dense block. ValueError naming the module when its router is not found (a child `gate` or
    `router` with a weight [experts, hidden]) or its experts are a layout not handled (no gate, a norm
    after each expert)."""
    found = []
    for path, module in block.named_modules():
        experts = _fused_experts(module)
        if experts is None:
            continue
        count = experts.gate_up_proj.shape[0]
        router_name = next((n for n in _ROUTER_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
        router = getattr(module, router_name) if router_name else None
        weight = getattr(router, "weight", None)
        if router is None or not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != count:
            raise ValueError(
                f"{type(module).__name__} at {path or 'the block'}: fused experts ({count}) without a router the "
                f"pruner recognises (a child named {' or '.join(_ROUTER_NAMES)} with a weight [{count}, hidden])"
            )
        if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
            raise ValueError(
                f"{type(experts).__name__} at {path}.experts: experts without a gate projection or with a norm "
                "after each expert are not handled"
            )
        found.append(MoE(path, module, router_name, router, experts))
    return found


def _view_linear(weight: Tensor) -> nn.Linear:
    """An nn.Linear (bias-free) whose weight is `weight` itself: writes go to the tensor it views."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def with_experts(block: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    """`linears` (a block's nn.Linear modules by name) without the routers' and shared-expert gates'
    Linears, followed by every routed expert's gate_proj, up_proj and down_proj as Linear views
    (module docstring), expert by expert. The block's own Linears when it has no MoE module."""
    layers = find_moe(block)
    if not layers:
        return linears
    gates = {f"{m.path}.{name}" for m in layers for name in (m.router_name, *_SHARED_GATES)}
    out = {n: lin for n, lin in linears.items() if n not in gates}
    for m in layers:
        for e in range(m.num_experts):
            for name, weight in zip(PROJECTIONS, m.views(e)):
                out[f"{m.expert(e)}.{name}"] = _view_linear(weight)
    return out


def covered(block: nn.Module) -> set[int]:
    """The ids of the fused expert parameters of a block (weights and biases): pruned through their
    views, so not weights the run left dense."""
    return {id(p) for m in find_moe(block) for p in m.experts.parameters()}


def expert_of(name: str) -> str | None:
    """The expert (`mlp.experts.3`) a Linear view's name belongs to, None for other Linears."""
    head, _, leaf = name.rpartition(".")
    parts = head.rsplit(".", 2)
    if leaf in PROJECTIONS and len(parts) >= 2 and parts[-2] == "experts" and parts[-1].isdigit():
        return head
    return None


def check_rare(policy: object, minimum: object) -> None:
    """ValueError naming `rare_experts` or `min_expert_tokens` when either is not a valid choice."""
    if policy not in RARE_EXPERTS:
        raise ValueError(f"rare_experts must be one of {RARE_EXPERTS}, got {policy!r}")
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise ValueError(f"min_expert_tokens must be an int >= 0, got {minimum!r}")


@dataclass
class _Layer:
    """What the calibration of one MoE module keeps: routed tokens per expert, the last router logits
    and, for rare_experts="route", the best candidates not routed to each expert."""

    moe: MoE
    counts: Tensor
    logits: Tensor | None = None
    candidate_scores: Tensor | None = None  # [m, E]
    candidate_inputs: Tensor | None = None  # [m, E, H]
    handles: list = field(default_factory=list)


class Routing:
    """Context manager for a block's statistics pass: the fused experts of each MoE module run their
    routed tokens through the Linear views in `linears` (the objects the statistics hooks watch), expert
    by expert, counting them (module docstring). `force()` (rare_experts="route") then sends candidate
    tokens through the experts below `minimum`; `rare` lists those experts and their routed tokens."""

    def __init__(self, block: nn.Module, linears: dict[str, nn.Linear], policy: str, minimum: int) -> None:
        self.linears, self.policy, self.minimum = linears, policy, minimum
        self.layers = [_Layer(m, torch.zeros(m.num_experts, dtype=torch.int64)) for m in find_moe(block)]

    def __enter__(self) -> Routing:
        for layer in self.layers:

            def forward(hidden, index, weights, layer=layer):
                return self._forward(layer, hidden, index, weights)

            layer.moe.experts.forward = forward
            if self.policy == "route" and self.minimum > 0:

                def keep_logits(_module, _args, output, layer=layer):
                    layer.logits = output[0].detach()

                layer.handles.append(layer.moe.router.register_forward_hook(keep_logits))
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            with contextlib.suppress(AttributeError):
                del layer.moe.experts.forward
            for h in layer.handles:
                h.remove()
            layer.handles.clear()

    def _expert(self, layer: _Layer, e: int, x: Tensor, w: Tensor) -> Tensor:
        """Expert e of the layer on its tokens x [t, H] with router weights w [t, 1], through its views."""
        moe = layer.moe
        gate, up, down = (self.linears[f"{moe.expert(e)}.{p}"] for p in PROJECTIONS)
        g, u = gate(x), up(x)
        biases = moe.biases(e)
        if biases is not None:
            g, u = g + biases[0], u + biases[1]
        concatenated = getattr(moe.experts, "is_concatenated", True)
        gate_up = torch.cat([g, u], -1) if concatenated else torch.stack([g, u], -1).flatten(-2)
        y = down(moe.experts._apply_gate(gate_up) * w.to(g.dtype))
        return y if biases is None else y + w.to(y.dtype) * biases[2]

    def _forward(self, layer: _Layer, hidden: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden)
        count = layer.moe.num_experts
        hits = torch.bincount(index.reshape(-1).cpu(), minlength=count)[:count]
        layer.counts += hits
        for e in hits.nonzero().flatten().tolist():
            token, slot = torch.where(index == e)
            y = self._expert(layer, e, hidden[token], weights[token, slot, None])
            out.index_add_(0, token, y.to(out.dtype))
        if layer.logits is not None:
            self._candidates(layer, hidden, index)
        return out

    def _candidates(self, layer: _Layer, hidden: Tensor, index: Tensor) -> None:
        """Keeps, per expert, the `minimum` tokens with the highest router logit among those not routed
        to it (over every batch so far)."""
        logits = layer.logits.float().reshape(hidden.shape[0], -1)
        routed = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, index, True)
        scores = logits.masked_fill(routed, -torch.inf)
        take = min(self.minimum, scores.shape[0])
        top, rows = scores.topk(take, dim=0)  # [take, E]
        inputs = hidden[rows]  # [take, E, H]
        if layer.candidate_scores is not None:
            top = torch.cat([layer.candidate_scores, top])
            inputs = torch.cat([layer.candidate_inputs, inputs])
            top, keep = top.topk(min(self.minimum, top.shape[0]), dim=0)
            inputs = inputs.gather(0, keep.unsqueeze(-1).expand(-1, -1, inputs.shape[-1]))
        layer.candidate_scores, layer.candidate_inputs = top, inputs
        layer.logits = None

    def force(self) -> None:
        """rare_experts="route": each expert below `minimum` routed tokens also sees the best candidates
        (their logits finite) until it has `minimum`, with router weight 1/top_k, for its statistics."""
        if self.policy != "route":
            return
        for layer in self.layers:
            if layer.candidate_scores is None:
                continue
            w = 1.0 / layer.moe.top_k
            for e, routed in enumerate(layer.counts.tolist()):
                need = self.minimum - routed
                finite = torch.isfinite(layer.candidate_scores[:, e])
                x = layer.candidate_inputs[:, e][finite][: max(need, 0)]
                if need > 0 and len(x):
                    self._expert(layer, e, x, torch.full((len(x), 1), w, device=x.device))

    def reduce(self, comm) -> None:
        """Sums the routed-token counts over the ranks of a `distributed.Communicator` (each ran its own
        batches), so that every rank finds the same rare experts; forced tokens stay each rank's own."""
        comm.all_reduce_sum_([layer.counts for layer in self.layers])

    @property
    def rare(self) -> dict[str, int]:
        """{expert name relative to the block: its routed calibration tokens} for the experts below
        `minimum` (before any forced tokens), and those that got no token at all."""
        return {
            layer.moe.expert(e): n
            for layer in self.layers
            for e, n in enumerate(layer.counts.tolist())
            if n < max(self.minimum, 1)
        }


def set_aside(linears: dict[str, nn.Linear], stats: dict, rare: dict[str, int], policy: str) -> dict[str, nn.Linear]:
    """Removes from `linears` (a Block's, in place) and returns the expert Linears the method must not
    see: those of the `rare` experts for "dense" and "magnitude" (left dense, or pruned by |W| by the
    caller); for "route" those that still have no statistics (no calibration token at all)."""
    names = [
        n
        for n in linears
        if (expert := expert_of(n)) is not None and (n not in stats or (policy != "route" and expert in rare))
    ]
    return {n: linears.pop(n) for n in names}


def aside_scores(aside: dict[str, nn.Linear], policy: str, keep_all: bool = False) -> dict[str, Tensor]:
    """float32 scores of the Linears `set_aside` took out: |W| for rare_experts="magnitude"; for
    "dense" and "route" none (they stay as they are) or, with `keep_all` (a whole-model threshold), +inf."""
    if policy == "magnitude":
        return {n: lin.weight.detach().abs().float() for n, lin in aside.items()}
    if not keep_all:
        return {}
    return {n: torch.full_like(lin.weight, torch.inf, dtype=torch.float32) for n, lin in aside.items()}


def check_experts(method: object, name: str, block: nn.Module) -> None:
    """ValueError when a method that takes gradients of the block's Linear weights on the block alone
    (it keeps the dense outputs as targets) meets a block with fused experts, whose views are not the
    parameters its forward uses."""
    if getattr(method, "keeps_targets", False) and find_moe(block):
        raise ValueError(
            f"method {method.name!r} takes gradients of the Linear weights of block {name}, whose fused "
            "mixture-of-experts experts are not Linears: choose a method that scores from the weights and "
            "their input statistics"
        )


def known(moe: MoE) -> str:
    """The architecture of a router whose routing rule is known (ROUTERS); UsageError naming the router's
    class and place otherwise."""
    if moe.architecture is None:
        raise UsageError(
            f"the router {type(moe.router).__name__} at {moe.path}.{moe.router_name} is not one the pruner "
            f"recognises (known: {', '.join(ROUTERS)})"
        )
    return moe.architecture


def count_key(config: object, moe: MoE) -> str:
    """The config field holding the routed experts' count of a known architecture (`known`)."""
    architecture = known(moe)
    key = COUNT_KEYS[architecture]
    if not hasattr(config, key):
        raise UsageError(f"{type(config).__name__} has no expert count {key!r} for its {architecture} router")
    return key


def route(moe: MoE, x: Tensor, removed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(top-k weights, top-k indices) of a known router on tokens x [t, H], by its architecture's rule
    (written out below, equal to the stock router's), with the experts `removed` (bool [E]) never chosen:
    their logits −inf (DeepSeek-V3: their choice scores). UsageError for a router not in ROUTERS.

        mixtral, qwen2/3_moe, olmoe  p = softmax(x Wᵀ); top-k of p; renormalized (Mixtral always, the
                                     others when norm_topk_prob)
        deepseek_v3                  s = sigmoid(x Wᵀ); choice s + b over the best topk_group of n_group
                                     groups (each scored by its two best); weights s of the chosen,
                                     renormalized when norm_topk_prob, × routed_scaling_factor
        gpt_oss                      top-k of the logits x Wᵀ + b, softmax over them"""
    router, architecture = moe.router, known(moe)
    k, blocked = moe.top_k, removed if removed is not None else torch.zeros(moe.num_experts, dtype=torch.bool)
    blocked = blocked.to(x.device)
    if architecture == "gpt_oss":
        logits = F.linear(x, router.weight, router.bias).masked_fill(blocked, -torch.inf)
        top, index = logits.topk(k, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype), index
    if architecture == "deepseek_v3":
        scores = F.linear(x.float(), router.weight.float()).sigmoid()
        choice = (scores + router.e_score_correction_bias).masked_fill(blocked, -torch.inf)
        groups = choice.view(-1, router.num_group, moe.num_experts // router.num_group)
        best = torch.topk(groups.topk(2, dim=-1)[0].sum(-1), k=router.topk_group, dim=-1, sorted=False)[1]
        allowed = torch.zeros_like(groups[..., 0]).scatter_(1, best, 1).bool()
        choice = choice.masked_fill(~allowed.repeat_interleave(groups.shape[-1], dim=1), -torch.inf)
        index = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, index
    logits = F.linear(x, router.weight).masked_fill(blocked, -torch.inf)
    top, index = torch.softmax(logits, dim=-1, dtype=torch.float).topk(k, dim=-1)
    if architecture == "mixtral" or router.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    return (top if architecture == "mixtral" else top.to(logits.dtype)), index
