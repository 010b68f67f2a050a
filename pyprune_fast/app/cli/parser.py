"""The command line's parser: the option groups the commands share and one subcommand per command
module (its `run` and its options class set as the subparser's defaults)."""

from __future__ import annotations

import argparse

from . import bench as bench_cmd
from . import info as info_cmd
from . import prune as prune_cmd
from . import score as score_cmd
from . import sensitivity as sensitivity_cmd
from .options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCHES,
    DEFAULT_CHANNEL_CRITERIA,
    DEFAULT_CRITERIA,
    DEFAULT_SEQ_LEN,
    DEFAULT_SPARSITIES,
    BenchOptions,
    PruneOptions,
    ScoreOptions,
    SensitivityOptions,
)


def _add_model_options(p: argparse.ArgumentParser, criteria: list[str], out: str, out_help: str) -> None:
    from ...criteria import CRITERIA
    from ...criteria.registry import KINDS
    from ...llm import METHODS

    p.add_argument(
        "--model",
        default=None,
        help="default: the embedded pretrained all-MiniLM-L6-v2 on pydoc_data text; or torchvision:NAME "
        "(pip install 'pyprune-fast[vision]'), timm:NAME ('pyprune-fast[timm]'), hf:PATH (a local Hugging Face "
        "directory; causal LMs: 'pyprune-fast[llm]'), smollm2 (the embedded LLM), package.module:factory",
    )
    kinds = {kind: ", ".join(c for c in criteria if c in CRITERIA and CRITERIA[c].kind == kind) for kind in KINDS}
    p.add_argument(
        "--criterion",
        nargs="+",
        default=None,
        choices=criteria,
        metavar="C",
        help=f"criteria (default: {' '.join(DEFAULT_CRITERIA)}, or {' '.join(DEFAULT_CHANNEL_CRITERIA)} for the "
        f"channel granularities; weight criteria: {kinds['weight']}; channel criteria: {kinds['channel']}; "
        f"LLM methods (default magnitude wanda sparsegpt): {', '.join(METHODS)})",
    )
    p.add_argument("--out", default=out, help=f"output directory (default ./{out}); {out_help}")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_data_options(p: argparse.ArgumentParser, evaluation: bool) -> None:
    """Where the calibration (and, for prune, evaluation) data come from and how they are cut."""
    group = p.add_argument_group(
        "data (your own files in place of the model's packaged data)",
        "An image folder (one subfolder of images per class, as torchvision's ImageFolder; preprocessed as the "
        "model expects, labels = the class folders in sorted order) for torchvision:/timm: models; text (a file, "
        'or a folder of .txt and .jsonl files; .jsonl lines are JSON objects with a "text" field) for language '
        "models, tokenized with the model's tokenizer.",
    )
    group.add_argument(
        "--data",
        metavar="PATH",
        help="calibration data for the criteria: image batches with their labels (cross-entropy), or text cut "
        "into --seq-len token sequences",
    )
    if evaluation:
        group.add_argument(
            "--eval-data",
            metavar="PATH",
            help="evaluation data: top-1 accuracy against the folder's labels (image classifiers), perplexity "
            "(causal LMs), agreement with the dense model's outputs (other models)",
        )
    group.add_argument(
        "--batches",
        type=int,
        default=DEFAULT_BATCHES,
        help=f"calibration batches for the criteria (default {DEFAULT_BATCHES})",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images or sequences per batch read from --data / --eval-data, and the sequences per --finetune step of "
        f"a causal LM (default {DEFAULT_BATCH_SIZE})",
    )
    group.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        help=f"tokens per text sequence: calibration and evaluation windows (default {DEFAULT_SEQ_LEN})",
    )


def _add_pruning_options(p: argparse.ArgumentParser, choices: list[str]) -> None:
    group = p.add_argument_group("pruning")
    group.add_argument(
        "--sparsity",
        nargs="+",
        type=float,
        default=None,
        metavar="S",
        help=f"fractions of the scored weights to prune (default: {' '.join(map(str, DEFAULT_SPARSITIES))})",
    )
    group.add_argument(
        "--granularity",
        default=None,
        choices=choices,
        help="global: one threshold over all scored weights; layerwise: each tensor; per-row: each output "
        "row; 2:4: 2 of every 4 consecutive weights of a row (weights whose row length is not divisible "
        "by 4 are left dense and listed in the report); channel / channel-layerwise: whole output channels "
        "of every Conv/Linear, ranked by a channel criterion over all layers / within each layer, zeroed "
        "(default global; for LLMs each method's own groups and 2:4)",
    )
    group.add_argument(
        "--remove-channels",
        action="store_true",
        help="with a channel granularity: remove the pruned channels physically (Torch-Pruning: pip install "
        "torch-pruning) instead of zeroing them, and report the smaller model's parameter count",
    )
    group.add_argument(
        "--save-model",
        nargs="?",
        const=True,
        default=False,
        metavar="DIR",
        help="also write each pruned model (fine-tuned with --finetune): Hugging Face models as from_pretrained "
        "directories <criterion>-<sparsity or 2of4>/ (under DIR if given, else --out), others as safetensors files",
    )
    group.add_argument(
        "--finetune",
        type=int,
        default=0,
        metavar="STEPS",
        help="fine-tune each pruned model STEPS AdamW steps with its masks kept (the default model: InfoNCE on the "
        "calibration passages; causal LMs: next-token cross-entropy on the calibration sequences the pruning used, "
        "--batch-size a step, after the last round of --schedule iterative; the whole model in memory, not with "
        "--offload disk) and evaluate it before and after (default 0: no fine-tuning)",
    )
    group.add_argument("--finetune-lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    group.add_argument(
        "--schedule",
        choices=["one-shot", "iterative"],
        default="one-shot",
        help="one-shot: masks from one scoring; iterative: --rounds rounds, each re-scoring the model as pruned so "
        "far and pruning more (exponential schedule, exact final sparsity; causal LMs: each round a run of the "
        "block pipeline, the weights pruned before kept pruned; not for 2:4 nor with --offload disk)",
    )
    group.add_argument("--rounds", type=int, default=5, help="rounds of --schedule iterative (default 5)")


def _add_llm_options(p: argparse.ArgumentParser) -> None:
    """Options of the block-by-block LLM path only (--model smollm2 or hf:PATH of a causal LM)."""
    group = p.add_argument_group("LLMs (--model smollm2 or hf:PATH of a causal LM)")
    group.add_argument("--samples", type=int, default=16, help="calibration sequences of --seq-len (default 16)")
    group.add_argument(
        "--eval-tokens",
        type=int,
        default=8192,
        help="held-out tokens the perplexity is measured on (default 8192); 0 with --offload disk: no evaluation, "
        "only the pruned checkpoints",
    )
    group.add_argument(
        "--offload",
        choices=["disk"],
        default=None,
        help="disk: stream the model from its safetensors checkpoint one decoder block at a time (host memory "
        "≈ one block + the calibration activations) and write each pruned model at once as a checkpoint "
        "<method>-<sparsity or 2of4>/ under --save-model DIR (default --out); perplexities are measured "
        "streamed too, and no mask files are written (the checkpoints are the result)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="with --offload disk: continue runs that were killed mid-way after their last finished block",
    )
    _add_refine_option(group)


def _add_refine_option(group) -> None:
    from ...llm.refine import REFINEMENTS

    group.add_argument(
        "--refine",
        nargs="+",
        default=None,
        choices=list(REFINEMENTS),
        metavar="R",
        help="refinements of every method's masking, any subset in any order (applied by stage: pyprune_fast.llm."
        f"refine): {', '.join(REFINEMENTS)}; the report shows each one's gain",
    )


def _add_structured_options(p: argparse.ArgumentParser) -> None:
    """Options of structured pruning (--structure): smaller dense models, not masks."""
    from ...llm.structured import ALLOCATIONS, DEPTH_SCORES, SCORES
    from ...llm.structured.experts import SCORES as EXPERT_SCORES
    from ..structured import STRUCTURES

    group = p.add_argument_group(
        "structured pruning (--structure: MLP channels, attention heads or whole blocks removed for real)",
        "Causal LMs (smollm2, hf:PATH), the default MiniLM, hf:PATH encoders and ViTs, timm: and torchvision: ViTs. "
        f"--criterion picks the channel score of width: {', '.join(SCORES)} (default flap), the block score of "
        f"depth: {', '.join(DEPTH_SCORES)} (default influence; loss: causal LMs), or the expert score of "
        f"experts: {', '.join(EXPERT_SCORES)} (default reap).",
    )
    group.add_argument(
        "--structure",
        choices=list(STRUCTURES),
        default=None,
        help="width: remove MLP channels and attention heads in every block; depth: remove whole blocks (lowest "
        "block score); experts: remove routed experts of every mixture-of-experts layer; each result is a "
        "smaller dense model (no masks)",
    )
    group.add_argument(
        "--ratio",
        nargs="+",
        type=float,
        default=None,
        metavar="R",
        help="fractions of the blocks' parameters removed (experts: of each MoE layer's routed experts), each in "
        "(0, 1) (default 0.25)",
    )
    group.add_argument(
        "--allocation",
        choices=list(ALLOCATIONS),
        default="uniform",
        help="width: uniform (the same widths in every block: a standard config) or global (one threshold over "
        "the blocks' standardized scores; non-uniform widths) (default uniform)",
    )
    group.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="width: refit each layer that consumes removed channels by least squares (default on; "
        "--no-reconstruct: FLAP's bias compensation only)",
    )
    group.add_argument(
        "--multiple",
        type=int,
        default=1,
        metavar="N",
        help="width: round each kept MLP width to a multiple of N (64: the widths matrix-multiply kernels run fast "
        "at; odd widths made a ViT-B slower than dense on a CPU) (default 1: the exact budget)",
    )
    group.add_argument(
        "--distill",
        type=int,
        default=0,
        metavar="STEPS",
        help="causal LMs: fine-tune each pruned model STEPS AdamW steps against the dense model's logits (KL), "
        "on the calibration sequences (--data), --batch-size a step; perplexity before and after (default 0)",
    )
    group.add_argument("--distill-lr", type=float, default=1e-4, help="--distill learning rate (default 1e-4)")


def build_parser() -> argparse.ArgumentParser:
    from ...bench.registry import WORKLOADS
    from ...criteria import CRITERIA
    from ...llm import METHODS
    from ...llm.structured import DEPTH_SCORES, SCORES
    from ...llm.structured.experts import SCORES as EXPERT_SCORES
    from ..runner import CHOICES

    criteria = sorted(set(CRITERIA) | set(METHODS) | set(SCORES) | set(DEPTH_SCORES) | set(EXPERT_SCORES))
    parser = argparse.ArgumentParser(
        prog="pyprune-fast", description="Fast pruning criteria, masks and sparse kernels."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser(
        "prune",
        help="score, build masks, evaluate; write masks, report.json, report.md and plots",
        description="Scores the model once per criterion, builds the masks of every sparsity from those "
        "scores, evaluates each pruned model against the dense one and writes masks (safetensors), "
        "report.json, report.md and plots to --out.",
    )
    _add_model_options(
        prune,
        criteria,
        "pyprune-out",
        "replaced as a whole (it must be new, empty, or an earlier prune's output; anything else is refused)",
    )
    _add_data_options(prune, evaluation=True)
    _add_pruning_options(prune, CHOICES)
    _add_llm_options(prune)
    _add_structured_options(prune)
    prune.set_defaults(run=prune_cmd.run, options=PruneOptions)

    score = sub.add_parser("score", help="score a model with criteria and write the scores (safetensors)")
    _add_model_options(score, criteria, "pyprune-scores", "scores-<criterion>.safetensors are added or replaced")
    _add_data_options(score, evaluation=False)
    score.set_defaults(run=score_cmd.run, options=ScoreOptions)

    bench = sub.add_parser(
        "bench",
        help="a quick run of the benchmark suite: ours vs the baselines, one table",
        description="Times every workload (ours, then each baseline) at --scale. A workload that fails is marked "
        "'failed: <reason>' in the table and the others still run; the exit status is then 1.",
    )
    bench.add_argument(
        "--only",
        nargs="+",
        choices=list(WORKLOADS),
        metavar="W",
        help="workloads: " + ", ".join(WORKLOADS).replace("%", "%%"),
    )
    bench.add_argument(
        "--scale", type=float, default=0.1, help="shrink each workload's tensors, in (0, 1] (default 0.1)"
    )
    bench.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (default 5)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bench.add_argument(
        "--memory",
        action="store_true",
        help="also the peak resident memory above the level before the call, of one more call of each "
        "implementation (CPU only)",
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(run=bench_cmd.run, options=BenchOptions)

    sens = sub.add_parser(
        "sensitivity",
        help="prune one block (or layer) at a time, evaluate, restore; table, plot, per-unit budget allocation",
        description="Scores the model once, prunes each block (or layer) alone at each sparsity, evaluates it and "
        "restores it; writes sensitivity.json, sensitivity.md and sensitivity.png to --out, and the per-unit "
        "sparsities that meet --budget with the least loss the measured curves predict.",
    )
    _add_model_options(sens, criteria, "pyprune-sensitivity", "sensitivity.json, .md and .png are added or replaced")
    _add_data_options(sens, evaluation=True)
    sens.add_argument(
        "--sparsity", nargs="+", type=float, default=[0.5, 0.9], metavar="S", help="sparsities (default 0.5 0.9)"
    )
    sens.add_argument(
        "--granularity",
        choices=["block", "layer"],
        default="block",
        help="block: each numbered block (e.g. an encoder layer) pruned alone (default); layer: each weight",
    )
    sens.add_argument("--budget", type=float, default=0.5, help="global sparsity to allocate (default 0.5)")
    sens.set_defaults(run=sensitivity_cmd.run, options=SensitivityOptions)

    info = sub.add_parser("info", help="print backend_info(): what compiled kernels are loaded")
    info.set_defaults(run=info_cmd.run, options=None)
    return parser
