"""`pyprune-fast prune --structure width|depth`: app.structured.prune over the plan PruneOptions made,
each pruned model saved with --save-model as a directory <structure>-<score>-<ratio>/ (Hugging Face
models: from_pretrained directories with their config; timm and torchvision: llm.structured.save_vision's
safetensors), and the reports of every prune run."""

from __future__ import annotations

import os

from ...outdir import OutDir
from .context import need_matplotlib, save_pretrained
from .options import MODEL_MARKER, PruneOptions
from .reports import lead_reports


def run(options: PruneOptions) -> int:
    """Runs the command; returns the exit status."""
    from .. import structured

    need_matplotlib()
    out = OutDir(options.out, whole=True)

    def execute(staged, bundle):
        def on_model(result, model, tag) -> None:
            if not options.save_model:
                return
            directory = os.path.join(options.save_root, tag)
            with out.writes():
                part = structured.saved_part(bundle, model)
                if part is not None:
                    save_pretrained(staged, out.locate(directory), part, bundle.tokenizer)
                else:
                    save_vision(staged, out.locate(directory), model)
            result.files["model"] = os.path.relpath(directory, options.out)

        return structured.prune(bundle, options.plan, on_model=on_model, quiet=options.quiet)

    return lead_reports(options, out, execute, None)


def save_vision(staged, directory: str, model) -> None:
    """Stages a timm or torchvision model as llm.structured.save_vision's directory (safetensors with the
    pruned shapes), marked as ours by MODEL_MARKER."""
    import json

    from ..._version import __version__
    from ...llm.structured import save_vision as write

    temp = staged.directory(directory)
    write(model, temp, overwrite=True)
    with open(os.path.join(temp, MODEL_MARKER), "w") as f:
        json.dump({"written_by": "pyprune-fast prune --structure --save-model", "pyprune_fast_version": __version__}, f)
