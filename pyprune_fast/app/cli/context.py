"""What the commands share once their options are validated: the model's bundle with the user's
files in place of its data, the process group under torchrun, progress bars, and the checks that
need the loaded model."""

from __future__ import annotations

import datetime
import os
import sys

from ...errors import UsageError
from .options import MODEL_MARKER, Options, processes


def bar(iterable, desc: str, quiet: bool):
    """A tqdm progress bar over `iterable`, shown only on a terminal and without `quiet`."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=quiet or not sys.stderr.isatty())


def need_matplotlib() -> None:
    """UsageError unless matplotlib, which draws the plots, is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError("this command draws its plots with matplotlib: pip install 'pyprune-fast[cli]'") from exc


def load(options: Options):
    """The model's bundle (zoo.load, or zoo.offloaded with `offload`), with the user's files (data,
    eval_data) in place of its packaged data; prints where the data comes from when files are used."""
    from .. import data, llm_runner, zoo
    from ..bundle import LLMBundle

    if getattr(options, "offload", None):
        bundle = zoo.offloaded(options.model)
    else:
        bundle = zoo.load(options.model, options.device, calibration_batches=options.batches)
    if not options.files:
        return bundle
    if isinstance(bundle, LLMBundle):
        for name, part in (("data", "calibration"), ("eval_data", "evaluation")):
            path = options.files.get(name)
            if path is not None:
                flag = "--" + name.replace("_", "-")
                tokens = data.text_tokens(path, flag, bundle.tokenizer)
                llm_runner.use_text(bundle, part, tokens, f"{flag} {path!r}")
    else:
        data.use_files(
            bundle,
            options.data,
            options.eval_data,
            batches=options.batches,
            batch_size=options.batch_size,
            seq_len=options.seq_len,
        )
    for key in ("data", "evaluation", "preprocessing"):
        if key in bundle.info:
            print(f"{key}: {bundle.info[key]}", flush=True)
    return bundle


def process_group(device: str):
    """torch.distributed's default group when launched by torchrun with several processes (gloo on the
    CPU, NCCL with each rank on its own GPU, LOCAL_RANK), else None; and the device of this rank."""
    if processes() <= 1:
        return None, device
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return dist.group.WORLD, device


def end_process_group(group) -> None:
    """Destroys the process group of `process_group`, if there is one."""
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def check_share(bundle, batches: int, group) -> None:
    """UsageError when the model's calibration batches cannot be shared out among the processes of
    `group` (runner.share's refusal, which every rank makes alike)."""
    from ..runner import share

    if group is None or not bundle.calibration:
        return
    try:
        share(bundle.calibration[:batches], group.rank(), group.size())
    except ValueError as exc:
        raise UsageError(f"`batches`: {exc}") from exc


def save_pretrained(staged, directory: str, model, tokenizer) -> None:
    """Stages a Hugging Face model (and its tokenizer) as a `from_pretrained` directory, marked as ours
    by options.MODEL_MARKER (a later run may replace a directory only with it)."""
    import json

    from ..._version import __version__

    temp = staged.directory(directory)
    model.save_pretrained(temp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(temp)
    with open(os.path.join(temp, MODEL_MARKER), "w") as f:
        json.dump({"written_by": "pyprune-fast prune --save-model", "pyprune_fast_version": __version__}, f)
