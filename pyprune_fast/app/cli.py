"""The `pyprune-fast` command line (also `python -m pyprune_fast`): prune, score, sensitivity, bench, info.

Exit status: 0 done, 1 some `bench` workloads failed (each is marked in the table; the others ran), 2 bad
input (model, data, criterion, option, output directory), 130 interrupted. Every file is written to a
temporary and renamed into place only when the whole run has succeeded: an error or an interrupt
replaces no file and leaves no temporary behind. `prune` stages its whole --out in a temporary sibling
directory and switches it in with one rename, so a rerun replaces the previous run's output as a whole
(never a mix of old masks and a new report); it refuses an --out that holds anything else."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

DEFAULT_CRITERIA = ["magnitude", "snip", "refer", "afr"]
DEFAULT_CHANNEL_CRITERIA = ["l1", "taylor", "fisher"]
DEFAULT_SPARSITIES = [0.5, 0.8, 0.9]
DEFAULT_BATCHES = 4
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEQ_LEN = 256


class UsageError(ValueError):
    """A bad option value or an output directory that cannot be written."""


def _error(message: str) -> int:
    print(f"pyprune-fast: error: {message}", file=sys.stderr)
    return 2


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device (expected auto, cpu, cuda or cuda:N): {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine")
    return name


def _prune_output_entries(path: str) -> set[str]:
    """The entries of the directory that an earlier `pyprune-fast prune` wrote there: those its
    report.json lists (the top-level names of its "files"), with report.json itself; none without one."""
    try:
        with open(os.path.join(path, "report.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return set()
    command = report.get("command") if isinstance(report, dict) else None
    files = report.get("files") if isinstance(report, dict) else None
    if not (isinstance(command, list) and command[:2] == ["pyprune-fast", "prune"] and isinstance(files, list)):
        return set()
    return {"report.json"} | {f.replace(os.sep, "/").split("/")[0] for f in files if isinstance(f, str)}


class OutDir:
    """The output directory, checked before any work. With `whole` (prune), the run's whole output is
    staged in a temporary sibling directory and switched in by commit() with one rename, replacing an
    earlier prune's output as a whole; an --out holding anything else is refused. Otherwise (score,
    and the resumable --offload disk runs) --out is created and files are renamed into it one by one.
    remove_created() takes away the staging and the directories this run created."""

    def __init__(self, path: str, whole: bool = False) -> None:
        from ..io import discard, new_temp, new_temp_dir

        self.path, self.staging, self.created = path, None, []
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"--out {path!r} exists and is not a directory")
        if whole and os.path.isdir(path):
            absolute = os.path.abspath(path)
            if os.path.commonpath([absolute, os.getcwd()]) == absolute:
                raise UsageError(
                    f"--out {path!r} is the working directory or holds it; prune replaces its --out directory as a "
                    "whole: choose a new or empty directory"
                )
            foreign = sorted(set(os.listdir(path)) - _prune_output_entries(path))
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise UsageError(
                    f"--out {path!r} holds files that are not the output of an earlier pyprune-fast prune ({shown}); "
                    "prune replaces its --out directory as a whole: choose a new or empty directory"
                )
        head = os.path.abspath(path)
        if whole:
            head = os.path.dirname(head)  # --out itself is made by the final rename
        while not os.path.exists(head):
            self.created.append(head)
            head = os.path.dirname(head)
        try:
            if whole:
                self.staging = new_temp_dir(os.path.realpath(path))  # a symlinked --out: its target
            else:
                os.makedirs(path, exist_ok=True)
                discard(new_temp(os.path.join(path, "probe")))
        except OSError as exc:
            self.remove_created()
            raise UsageError(f"--out {path!r} cannot be written: {exc.strerror or exc}") from exc

    def file(self, name: str) -> str:
        """Where the output file `name` is written now (in the staging directory, with `whole`)."""
        return os.path.join(self.staging or self.path, name)

    def locate(self, path: str) -> str:
        """Where `path` is written now: inside the staging directory when it lies under --out."""
        absolute, out = os.path.abspath(path), os.path.abspath(self.path)
        if self.staging is None or os.path.commonpath([absolute, out]) != out:
            return path
        return os.path.join(self.staging, os.path.relpath(absolute, out))

    def commit(self) -> None:
        """With `whole`: the staged output becomes --out in one rename (an earlier output is moved aside
        first and removed once the new one is in place, or put back if the rename fails)."""
        from ..io import commit_dir

        if self.staging is None:
            return
        try:
            mode = os.stat(os.path.realpath(self.path)).st_mode & 0o7777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o777 & ~umask
        os.chmod(self.staging, mode)  # mkdtemp made it 0o700
        commit_dir(self.staging, os.path.realpath(self.path))
        self.staging = None

    def remove_created(self) -> None:
        from ..io import discard

        if self.staging is not None:
            discard(self.staging)
            self.staging = None
        for directory in self.created:
            try:
                os.rmdir(directory)
            except OSError:
                return


def _bar(iterable, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=quiet or not sys.stderr.isatty())


def _load(args):
    """The model's bundle, with the user's files (--data, --eval-data) in place of its packaged data;
    the paths are checked before the model loads. Prints where the data comes from when files are used."""
    from . import data, llm_runner, zoo

    files = {"--data": getattr(args, "data", None), "--eval-data": getattr(args, "eval_data", None)}
    for option, path in files.items():
        if path is not None:
            data.check_path(path, option)
    used = any(files.values())
    if used and zoo.is_default(args.model):
        raise UsageError(
            f"{' and '.join(o for o, p in files.items() if p)} do not apply to the default model (calibrated and "
            "evaluated on its packaged text); name a model: --model torchvision:NAME | timm:NAME | hf:PATH | smollm2"
        )
    if getattr(args, "offload", None):
        bundle = zoo.offloaded(args.model)
    else:
        bundle = zoo.load(args.model, _device(args.device), calibration_batches=args.batches)
    if not used:
        return bundle
    if isinstance(bundle, llm_runner.LLMBundle):
        llm_runner.use_text_files(bundle, files["--data"], files["--eval-data"])
    else:
        data.use_files(
            bundle,
            files["--data"],
            files["--eval-data"],
            batches=args.batches,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
        )
    for key in ("data", "evaluation", "preprocessing"):
        if key in bundle.info:
            print(f"{key}: {bundle.info[key]}", flush=True)
    return bundle


def _check_batches(args) -> None:
    for option, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")


def cmd_info(args) -> int:
    import pyprune_fast

    print(json.dumps(pyprune_fast.backend_info(), indent=2, default=str))
    return 0


def cmd_score(args) -> int:
    from ..distributed import Communicator
    from . import zoo

    _check_batches(args)
    if zoo.is_llm_spec(args.model):
        raise UsageError("score does not apply to causal LMs (pruned block by block): use pyprune-fast prune")
    group = _process_group(args)
    try:
        return _score(args, None if group is None else Communicator(group))
    finally:
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _score(args, comm) -> int:
    """Each criterion's scores written as scores-<criterion>.safetensors. Under torchrun (`comm`) the
    calibration batches are shared out over the ranks and rank 0 writes the scores of all of them."""
    from safetensors.torch import save_file

    from ..distributed import session
    from ..io import Staged
    from .runner import check_criteria, score_criterion

    lead = comm is None or comm.rank == 0
    out = OutDir(args.out) if lead else None
    try:
        bundle = _load(args)
        names = args.criterion or DEFAULT_CRITERIA
        check_criteria(bundle, names)
        rows = []
        with Staged() as staged, session(comm):
            for name in _bar(names, "scoring", args.quiet or not lead):
                start = time.perf_counter()
                scores = score_criterion(bundle, name, args.batches, comm)
                seconds = time.perf_counter() - start
                if not lead:
                    continue
                path = out.file(f"scores-{name}.safetensors")
                save_file(
                    {k: v.detach().contiguous().cpu() for k, v in scores.items()},
                    staged.path(path),
                    metadata={"criterion": name, "model": bundle.name, "calibration_batches": str(args.batches)},
                )
                n = sum(s.numel() for s in scores.values())
                mean = sum(float(s.double().sum()) for s in scores.values()) / max(n, 1)
                top = max(float(s.max()) for s in scores.values())
                rows.append(f"{name:12s} {seconds:8.2f} {n:12d} {mean:11.4g} {top:11.4g}  {path}")
            if lead:
                staged.commit()
    except BaseException:
        if out is not None:
            out.remove_created()
        raise
    if lead:
        print(f"{'criterion':12s} {'seconds':>8s} {'entries':>12s} {'mean':>11s} {'max':>11s}  file")
        print("\n".join(rows))
    return 0


def _save_root(args) -> str:
    """Where --save-model writes: the directory given to it, else --out."""
    return args.save_model if isinstance(args.save_model, str) else args.out


def _save_pretrained(staged, directory: str, model, tokenizer) -> None:
    """Stages a Hugging Face model (and its tokenizer) as a `from_pretrained` directory."""
    temp = staged.directory(directory)
    model.save_pretrained(temp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(temp)


def _file_writer(args, out: OutDir, staged, bundle, single: bool):
    """The on_masks callback of runner.prune: stages each result's masks (and with --save-model the
    pruned weights, while the masks are applied) as masks[-<criterion>-<sparsity>].safetensors; a
    Hugging Face model is saved as a `from_pretrained` directory <criterion>-<sparsity>/ instead."""
    from safetensors.torch import save_model

    from .. import __version__
    from ..io import save_masks
    from .runner import TWO_FOUR

    def write(result, masks, model) -> None:
        two_four = args.granularity == TWO_FOUR
        label = f"{result.criterion}-{'2of4' if two_four else f'{result.sparsity:g}'}"
        tag = "" if single else f"-{label}"
        meta = {
            "criterion": result.criterion,
            "sparsity": TWO_FOUR if two_four else result.sparsity,
            "achieved_sparsity": result.achieved,
            "granularity": args.granularity,
            "model": bundle.name,
            "calibration_batches": min(args.batches, len(bundle.calibration or [])),
            "metrics": result.metrics,
            **({"finetuned_metrics": result.finetuned} if result.finetuned is not None else {}),
        }
        result.files["masks"] = f"masks{tag}.safetensors"
        save_masks(staged.path(out.file(result.files["masks"])), masks, meta)
        pretrained = bundle.pretrained if model is bundle.model else None
        if args.save_model and pretrained is not None:
            directory = os.path.join(_save_root(args), label)
            _save_pretrained(staged, out.locate(directory), pretrained, bundle.tokenizer)
            result.files["model"] = os.path.relpath(directory, args.out)
        elif args.save_model:
            result.files["model"] = f"model{tag}.safetensors"
            strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
            strings["pyprune_fast_version"] = __version__
            save_model(model, staged.path(out.file(result.files["model"])), strings)

    return write


def _write_reports(run, out: OutDir, staged, argv: list[str]) -> tuple[list[str], list[str]]:
    """Stages the plots, report.json and report.md; returns (every file of the run, the plots)."""
    from . import report

    plots = [report.LAYERS_PLOT]
    if run.dense:
        plots.insert(0, report.RETENTION_PLOT)
        report.retention_plot(run, staged.path(out.file(report.RETENTION_PLOT)))
    report.layers_plot(run, staged.path(out.file(report.LAYERS_PLOT)))
    files = [f for r in run.results for f in r.files.values()] + plots + ["report.json", "report.md"]
    with open(staged.path(out.file("report.json")), "w") as f:
        json.dump(report.to_json(run, ["pyprune-fast", *argv], files), f, indent=2, allow_nan=False)
    with open(staged.path(out.file("report.md")), "w") as f:
        f.write(report.markdown(run, files, plots))
    return files, plots


def cmd_prune(args) -> int:
    from . import runner, zoo

    if zoo.is_llm_spec(args.model):
        return _prune_llm(args)
    args.granularity = args.granularity or "global"
    if args.granularity == runner.TWO_FOUR and args.sparsity is not None:
        raise UsageError("--sparsity does not apply to --granularity 2:4 (2 of every 4 weights are kept: 0.5)")
    sparsities = runner.check_sparsities(args.sparsity or DEFAULT_SPARSITIES)
    channel = runner.kind_of(args.granularity) == "channel"
    criteria = list(dict.fromkeys(args.criterion or (DEFAULT_CHANNEL_CRITERIA if channel else DEFAULT_CRITERIA)))
    if args.remove_channels and not channel:
        raise UsageError(f"--remove-channels applies to --granularity {' or '.join(runner.CHANNEL_SCOPES)}")
    _check_batches(args)
    if args.finetune < 0:
        raise UsageError(f"--finetune must be >= 0, got {args.finetune}")
    if args.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {args.rounds}")
    if args.schedule == "iterative" and args.granularity not in runner.GRANULARITIES:
        raise UsageError(f"--schedule iterative prunes weights: use --granularity {' or '.join(runner.GRANULARITIES)}")
    if args.schedule == "iterative" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--schedule iterative re-scores the pruned model in one process: not under torchrun")
    _need_matplotlib()
    group = _process_group(args)
    lead = group is None or group.rank() == 0
    out = OutDir(args.out, whole=True) if lead else None
    single = len(criteria) == 1 and (len(sparsities) == 1 or args.granularity == runner.TWO_FOUR)

    def execute(staged, bundle):
        return runner.prune(
            bundle,
            criteria,
            sparsities,
            args.granularity,
            args.batches,
            remove_channels=args.remove_channels,
            on_masks=_file_writer(args, out, staged, bundle, single) if lead else None,
            quiet=args.quiet,
            group=group,
            finetune=args.finetune,
            finetune_lr=args.finetune_lr,
            schedule=args.schedule,
            rounds=args.rounds,
        )

    return _lead_reports(args, out, execute, group)


def _lead_reports(args, out: OutDir | None, execute, group) -> int:
    """`_run_and_report` on rank 0 (or in a single process); the other ranks of a torchrun load the
    model and take part in `execute` (the distributed scoring or pruning) without writing anything.
    The process group is destroyed on the way out."""
    try:
        if group is None or group.rank() == 0:
            return _run_and_report(args, out, execute)
        execute(None, _load(args))
        return 0
    finally:
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError("prune draws its plots with matplotlib: pip install 'pyprune-fast[cli]'") from exc


def _run_and_report(args, out: OutDir, execute) -> int:
    """Loads the model, runs `execute(staged, bundle) -> Run`, stages the reports, commits every file
    and switches the staged --out in (OutDir.commit); prints the summary. On any failure or interrupt
    before that rename, --out is as it was and the staging and new directories go."""
    from ..io import Staged
    from . import report

    start = time.perf_counter()
    try:
        with Staged() as staged:
            bundle = _load(args)
            loaded = time.perf_counter() - start
            run = execute(staged, bundle)
            run.seconds = {"load": loaded, **run.seconds, "total": time.perf_counter() - start}
            files, plots = _write_reports(run, out, staged, args.argv)
            staged.commit()
            out.commit()
    except BaseException:
        out.remove_created()
        raise
    print(report.summary_table(run))
    if "peak memory (formula)" in run.info:
        print(f"peak memory per block (formula in pyprune_fast.llm.pipeline): {run.info['peak memory (formula)']}")
    if "peak host memory (RSS)" in run.info:
        print(f"peak host memory (RSS of the process, streamed from disk): {run.info['peak host memory (RSS)']}")
    print(
        f"\nwrote {len(files)} files to {args.out}/ (report.md, report.json, {', '.join(plots)}) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0


LLM_GRANULARITIES = {None: None, "per-row": "row", "layerwise": "layer", "global": "global", "2:4": None}


def _check_llm_schedule(args, iterative: bool) -> None:
    """The refusals of --finetune and --schedule iterative on a causal LM, before anything loads."""
    from .runner import TWO_FOUR

    if args.finetune < 0:
        raise UsageError(f"--finetune must be >= 0, got {args.finetune}")
    if args.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {args.rounds}")
    if args.finetune and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.offload and args.finetune:
        raise UsageError(
            "--finetune trains the whole model, which must then be in memory; --offload disk holds one decoder "
            "block at a time: leave out one of them"
        )
    if args.offload and iterative:
        raise UsageError(
            "--schedule iterative prunes the model in memory round after round; --offload disk streams one pass "
            "from checkpoint to checkpoint: leave out one of them"
        )
    if iterative and args.granularity == TWO_FOUR:
        raise UsageError(
            "--schedule iterative grows an unstructured sparsity over rounds; --granularity 2:4 is one fixed "
            "pattern (2 of every 4 weights kept), reached in one shot: use --schedule one-shot for it"
        )


def _prune_llm(args) -> int:
    """`prune` on a causal LM: llm_runner.prune over methods × targets, perplexity, the same reports."""
    from .. import llm
    from ..io import save_masks
    from . import llm_runner, runner

    if args.granularity not in LLM_GRANULARITIES:
        raise UsageError(
            f"--granularity {args.granularity} does not apply to LLMs (pruned block by block): use per-row, "
            "layerwise, global or 2:4, or leave it out (each method's own groups, and 2:4)"
        )
    if args.remove_channels:
        raise UsageError("--remove-channels does not apply to LLMs")
    iterative = args.schedule == "iterative"
    _check_llm_schedule(args, iterative)
    if args.granularity == runner.TWO_FOUR:
        if args.sparsity is not None:
            raise UsageError("--sparsity does not apply to --granularity 2:4 (2 of every 4 weights are kept: 0.5)")
        targets = [runner.TWO_FOUR]
    elif args.sparsity is not None:
        targets = runner.check_sparsities(args.sparsity)
    else:  # the default targets: 50 % and 2:4 (50 % alone with a granularity or the iterative schedule)
        targets = list(llm_runner.DEFAULT_TARGETS) if args.granularity is None and not iterative else [0.5]
    defaults = llm_runner.DEFAULT_METHODS
    if args.granularity == "global":  # SparseGPT chooses its masks inside its solve: no score to threshold
        defaults = [m for m in defaults if not llm.METHODS[m].prunes_in_place]
        chosen = [m for m in args.criterion or [] if m in llm.METHODS and llm.METHODS[m].prunes_in_place]
        if chosen:
            raise UsageError(
                f"--granularity global thresholds one score per weight; {chosen[0]} chooses its masks inside its "
                "solve, per block of columns: use per-row or layerwise for it"
            )
    methods = list(dict.fromkeys(args.criterion or defaults))
    unknown = [m for m in methods if m not in llm.METHODS]
    if unknown:
        raise UsageError(f"criteria {unknown} do not apply to LLMs; LLM methods: {', '.join(llm.METHODS)}")
    if args.resume and not args.offload:
        raise UsageError("--resume continues an --offload disk run: add --offload disk")
    _need_matplotlib()
    group = _process_group(args)
    lead = group is None or group.rank() == 0
    out = OutDir(args.out, whole=not args.offload) if lead else None
    options = {
        "granularity": LLM_GRANULARITIES[args.granularity],
        "samples": args.samples,
        "seq_len": args.seq_len,
        "eval_tokens": args.eval_tokens,
        "eval_seq_len": args.seq_len,
        "device": _device(args.device),
        "quiet": args.quiet,
        "group": group,
        "evaluate": lead,
    }

    def execute(staged, bundle):
        if args.offload:
            return llm_runner.prune_offloaded(bundle, methods, targets, _save_root(args), resume=args.resume, **options)
        options.update(finetune=args.finetune, finetune_lr=args.finetune_lr, batch_size=args.batch_size)
        options.update(schedule=args.schedule, rounds=args.rounds)

        def on_model(result, keep, model, tag) -> None:
            result.files["masks"] = f"masks-{tag}.safetensors"
            meta = {"criterion": result.criterion, "sparsity": tag.split("-")[-1], "model": bundle.name}
            save_masks(staged.path(out.file(result.files["masks"])), keep, meta)
            if args.save_model:
                directory = os.path.join(_save_root(args), tag)
                _save_pretrained(staged, out.locate(directory), model, bundle.tokenizer)
                result.files["model"] = os.path.relpath(directory, args.out)

        return llm_runner.prune(bundle, methods, targets, on_model=on_model, **options)

    return _lead_reports(args, out, execute, group)


def cmd_sensitivity(args) -> int:
    from ..io import Staged
    from . import sensitivity, zoo

    _check_batches(args)
    criterion = (args.criterion or ["magnitude"])[0]
    if len(args.criterion or []) > 1:
        raise UsageError(f"sensitivity takes one --criterion (default magnitude), got {args.criterion}")
    if zoo.is_llm_spec(args.model):
        raise UsageError("sensitivity does not apply to causal LMs (pruned block by block): use pyprune-fast prune")
    for s in args.sparsity:
        if not 0 < s <= 1:
            raise UsageError(f"--sparsity must be in (0, 1], got {s}")
    if not 0 <= args.budget <= max(args.sparsity):
        raise UsageError(f"--budget must be in [0, the highest --sparsity {max(args.sparsity)}], got {args.budget}")
    _need_matplotlib()
    out = OutDir(args.out)
    start = time.perf_counter()
    try:
        with Staged() as staged:
            bundle = _load(args)
            report, allocation = sensitivity.run(
                bundle, criterion, args.sparsity, args.granularity, args.budget, args.batches, args.quiet
            )
            meta = {
                "command": ["pyprune-fast", *args.argv],
                "model": bundle.name,
                "criterion": criterion,
                "granularity": args.granularity,
                "calibration_batches": min(args.batches, len(bundle.calibration or [])),
            }
            text = sensitivity.write(report, allocation, args.budget, meta, lambda name: staged.path(out.file(name)))
            staged.commit()
    except BaseException:
        out.remove_created()
        raise
    print(text)
    files = f"sensitivity.json, sensitivity.md, {sensitivity.PLOT}"
    print(f"wrote {files} to {args.out}/ in {time.perf_counter() - start:.0f} s")
    return 0


def _process_group(args):
    """torch.distributed's default group when launched by torchrun with several processes (gloo on
    CPU, NCCL with each rank on its own GPU, LOCAL_RANK), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = _device(args.device).startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return dist.group.WORLD


def cmd_bench(args) -> int:
    """Every workload (or --only's) in turn: ours, then each baseline. A workload that fails (building
    its inputs or any implementation raising) is reported in the table as `failed: <one line>` and the
    others still run; the exit status is then 1 (some workloads failed), else 0."""
    from ..bench.harness import one_line, peak_extra_bytes, time_case
    from ..bench.registry import WORKLOADS

    device = _device(args.device)
    if args.memory and device != "cpu":
        raise UsageError(f"--memory measures this process's resident memory: CPU only, not {device}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 < args.scale <= 1:
        raise UsageError(f"--scale must be in (0, 1], got {args.scale}")
    names = args.only or list(WORKLOADS)
    width = max(len(n) for n in names) + 1
    peak_column = f" {'peak extra MiB':>15s}" if args.memory else ""
    print(
        f"{'workload':{width}s} {'impl':42s} {'best ms':>10s} {'median ms':>10s} {'ours faster by':>15s}{peak_column}"
    )
    failed = []
    for name in _bar(names, "bench", args.quiet):
        try:
            case = WORKLOADS[name](device=device, scale=args.scale)
            timings = time_case(case, device, args.repeats, warmup=1, keep_going=True)
            impls = {"ours": case.ours, **case.baselines}
            peaks = {t.impl: peak_extra_bytes(impls[t.impl]) for t in timings if args.memory and t.error is None}
        except Exception as exc:
            failed.append(name)
            print(f"{name:{width}s} {'':42s} failed: {one_line(exc)}", flush=True)
            continue
        finally:
            case = None  # free the workload's tensors before the next one is built
        ours = timings[0].median
        for t in timings:
            if t.error is not None:
                print(f"{name:{width}s} {t.impl:42s} failed: {t.error}", flush=True)
                continue
            ratio = "" if t.impl == "ours" or timings[0].error else f"{t.median / ours:14.2f}x"
            peak = f" {peaks[t.impl] / 2**20:15.0f}" if args.memory else ""
            print(
                f"{name:{width}s} {t.impl:42s} {t.best * 1e3:10.2f} {t.median * 1e3:10.2f} {ratio:>15s}{peak}",
                flush=True,
            )
        if any(t.error for t in timings):
            failed.append(name)
    import torch

    print(
        f"\n{device}, {torch.get_num_threads()} threads, scale {args.scale:g}, median of {args.repeats} after 1 warm-up"
    )
    if failed:
        print(f"{len(failed)} of {len(names)} workloads failed: {', '.join(failed)}")
        return 1
    return 0


def _add_model_options(p: argparse.ArgumentParser, criteria: list[str], out: str, out_help: str) -> None:
    from ..criteria import CRITERIA
    from ..criteria.registry import KINDS
    from ..llm import METHODS

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
        "--eval-tokens", type=int, default=8192, help="held-out tokens the perplexity is measured on (default 8192)"
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


def build_parser() -> argparse.ArgumentParser:
    from ..bench.registry import WORKLOADS
    from ..criteria import CRITERIA
    from ..llm import METHODS
    from .runner import CHOICES

    criteria = sorted(set(CRITERIA) | set(METHODS))
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
    prune.set_defaults(run=cmd_prune)

    score = sub.add_parser("score", help="score a model with criteria and write the scores (safetensors)")
    _add_model_options(score, criteria, "pyprune-scores", "scores-<criterion>.safetensors are added or replaced")
    _add_data_options(score, evaluation=False)
    score.set_defaults(run=cmd_score)

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
    bench.set_defaults(run=cmd_bench)

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
    sens.set_defaults(run=cmd_sensitivity)

    sub.add_parser("info", help="print backend_info(): what compiled kernels are loaded").set_defaults(run=cmd_info)
    return parser


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGTERM, _terminated)  # `kill` cleans up like Ctrl-C
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("pyprune-fast: interrupted; no file was written or replaced", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as exc:
        return _error(str(exc))
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
