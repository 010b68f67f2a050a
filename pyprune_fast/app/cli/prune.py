"""`pyprune-fast prune`: score the model once per criterion, build the masks of every sparsity,
evaluate each pruned model against the dense one; write masks (and pruned models), report.json,
report.md and plots. Causal LMs go block by block (prune_llm). The whole output is staged and
switched in with one rename (outdir.OutDir with whole=True)."""

from __future__ import annotations

import json
import os

from ... import io
from ...outdir import OutDir
from .context import check_share, need_matplotlib, process_group, save_pretrained
from .options import PruneOptions
from .reports import lead_reports


def run(options: PruneOptions) -> int:
    """Runs the command; returns the exit status."""
    from .. import runner

    if options.plan is not None:  # --structure: smaller dense models
        from . import structured

        return structured.run(options)
    if options.llm:
        from . import prune_llm

        return prune_llm.run(options)
    need_matplotlib()
    group, options.device = process_group(options.device)
    lead = group is None or group.rank() == 0
    out = OutDir(options.out, whole=True) if lead else None
    granularity = options.granularity
    single = len(options.criteria) == 1 and (len(options.sparsities) == 1 or granularity == runner.TWO_FOUR)

    def execute(staged, bundle):
        check_share(bundle, options.batches, group)
        return runner.prune(
            bundle,
            options.criteria,
            options.sparsities,
            granularity,
            options.batches,
            remove_channels=options.remove_channels,
            on_masks=file_writer(options, out, staged, bundle, single) if lead else None,
            quiet=options.quiet,
            group=group,
            finetune=options.finetune,
            finetune_lr=options.finetune_lr,
            schedule=options.schedule,
            rounds=options.rounds,
            refine=options.refine,
        )

    return lead_reports(options, out, execute, group)


def file_writer(options: PruneOptions, out: OutDir, staged, bundle, single: bool):
    """The on_masks callback of runner.prune: stages each result's masks (and with save_model the
    pruned weights, while the masks are applied) as masks[-<criterion>-<sparsity>].safetensors; a
    Hugging Face model is saved as a `from_pretrained` directory <criterion>-<sparsity>/ instead."""
    from safetensors.torch import save_model

    from ..._version import __version__
    from ..runner import TWO_FOUR

    def write(result, masks, model) -> None:
        two_four = options.granularity == TWO_FOUR
        label = f"{result.criterion}-{'2of4' if two_four else f'{result.sparsity:g}'}"
        tag = "" if single else f"-{label}"
        meta = {
            "criterion": result.criterion,
            "sparsity": TWO_FOUR if two_four else result.sparsity,
            "achieved_sparsity": result.achieved,
            "granularity": options.granularity,
            "model": bundle.name,
            "calibration_batches": min(options.batches, len(bundle.calibration or [])),
            "metrics": result.metrics,
            **({"finetuned_metrics": result.finetuned} if result.finetuned is not None else {}),
        }
        result.files["masks"] = f"masks{tag}.safetensors"
        with out.writes():
            io.save_masks(staged.path(out.file(result.files["masks"])), masks, meta)
            pretrained = bundle.pretrained if model is bundle.model else None
            if options.save_model and pretrained is not None:
                directory = os.path.join(options.save_root, label)
                save_pretrained(staged, out.locate(directory), pretrained, bundle.tokenizer)
                result.files["model"] = os.path.relpath(directory, options.out)
            elif options.save_model:
                result.files["model"] = f"model{tag}.safetensors"
                strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
                strings["pyprune_fast_version"] = __version__
                save_model(model, staged.path(out.file(result.files["model"])), strings)

    return write
