"""`pyprune-fast prune` of a causal LM: llm_runner.prune (or prune_offloaded, streamed from disk) over
methods × targets, judged by perplexity, with the same reports as the other models. The LLM options
were checked by PruneOptions."""

from __future__ import annotations

import os

from ... import io
from ...errors import UsageError
from ...outdir import OutDir
from .context import need_matplotlib, process_group, save_pretrained
from .options import LLM_GRANULARITIES, PruneOptions
from .reports import lead_reports


def run(options: PruneOptions) -> int:
    """Runs the command on a causal LM; returns the exit status."""
    from .. import llm_runner

    need_matplotlib()
    group, options.device = process_group(options.device)
    lead = group is None or group.rank() == 0
    out = None
    if lead:  # offloaded: the checkpoints under --out are checked by llm.prune, the rest as a whole run's
        written = None
        if options.offload:
            written = options.model_dirs() if options.save_root == options.out else []
        out = OutDir(options.out, whole=not options.offload, also=written)
    common = {
        "granularity": LLM_GRANULARITIES[options.granularity],
        "samples": options.samples,
        "seq_len": options.seq_len,
        "eval_tokens": options.eval_tokens,
        "eval_seq_len": options.seq_len,
        "device": options.device,
        "quiet": options.quiet,
        "group": group,
        "evaluate": lead,
        "refine": options.refine,
    }

    def execute(staged, bundle):
        if options.offload:
            try:  # the checkpoint read and the pruned checkpoints written are the user's directories
                return llm_runner.prune_offloaded(
                    bundle, options.methods, options.targets, options.save_root, resume=options.resume, **common
                )
            except OSError as exc:
                raise UsageError(str(exc)) from exc

        def on_model(result, keep, model, tag) -> None:
            result.files["masks"] = f"masks-{tag}.safetensors"
            meta = {"criterion": result.criterion, "sparsity": tag.split("-")[-1], "model": bundle.name}
            with out.writes():
                io.save_masks(staged.path(out.file(result.files["masks"])), keep, meta)
                if options.save_model:
                    directory = os.path.join(options.save_root, tag)
                    save_pretrained(staged, out.locate(directory), model, bundle.tokenizer)
                    result.files["model"] = os.path.relpath(directory, options.out)

        refinement = options.refinement
        return llm_runner.prune(
            bundle,
            options.methods,
            options.targets,
            on_model=on_model,
            finetune=refinement.finetune,
            finetune_lr=refinement.finetune_lr,
            batch_size=refinement.batch_size,
            schedule=refinement.schedule,
            rounds=refinement.rounds,
            **common,
        )

    return lead_reports(options, out, execute, group)
