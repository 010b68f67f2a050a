#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/README.md, "GPU check"): for the first session that gets a device,
# within 8 minutes of an H100/H200 from a fresh machine, build included. Builds the library for this GPU's
# arch only, runs every CUDA test (pytest -m cuda), a compute-sanitizer memcheck and racecheck pass over
# every op on small shapes, and times every op with CUDA events (many iterations after a warm-up) against
# its baselines (torch.kthvalue at a size it finishes in time), reporting GB/s and TFLOP/s against the
# device's peaks. Writes benchmarks/results/gpu-<gpu>-<date>.json with a .log beside it, and copies both
# (with the test report) into $OUT when it is set (the device tool returns only $OUT). Every step has its
# own timeout, clipped to what is left of the 8-minute budget, so one hang cannot eat it; the exit status
# is 1 when any step failed. Needs the project's test dependencies (README.md) and nvcc (CUDA_HOME,
# default /usr/local/cuda); `python`, else `python3`, else $PYTHON.
#   benchmarks/gpu_check.sh            run it
#   benchmarks/gpu_check.sh --dry-run  print every step and run the summary step, without a GPU
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif command -v python >/dev/null 2>&1; then
  PY=python
elif command -v python3 >/dev/null 2>&1; then
  PY=python3
else
  echo "gpu_check: neither python nor python3 is on PATH (or set PYTHON)" >&2
  exit 1
fi
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--dry-run]" >&2
  exit 2
fi
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-470} # seconds for all steps; the summary and the copy take the rest of 480
work=$(mktemp -d)

if ((DRY)); then
  gpu="dry run" arch="9.0"
else
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
  if [[ -z "$arch" ]]; then # older drivers have no compute_cap field
    arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  fi
  if [[ -z "$gpu" || -z "$arch" ]]; then
    echo "gpu_check: no GPU found (nvidia-smi and torch.cuda both failed)" >&2
    exit 1
  fi
fi
slug=$(printf '%s' "$gpu" | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')
results="benchmarks/results"
((DRY)) && results="$work"
base="$results/gpu-$slug-$(date -u +%Y-%m-%d)"
log="$base.log"
: >"$log"
steps="$work/steps.tsv"
: >"$steps"

# Copies the results, the log and the test report into $OUT (when set) however the script ends.
copy_out() {
  [[ -n "${OUT:-}" ]] || return 0
  mkdir -p "$OUT" && cp -f "$log" "$OUT/" 2>/dev/null
  [[ -f "$base.json" ]] && cp -f "$base.json" "$OUT/"
  [[ -f "$work/tests.xml" ]] && cp -f "$work/tests.xml" "$OUT/$(basename "$base")-tests.xml"
  return 0
}
trap copy_out EXIT

# run NAME TIMEOUT_S COMMAND...: one step, its output appended to the log, its status and time recorded.
# The timeout is clipped to what is left of the budget; a step with less than 5 s left is not started (rc 124).
run() {
  local name=$1 limit=$2 t0 rc left
  shift 2
  left=$((budget - ($(date +%s) - start)))
  ((limit > left)) && limit=$left
  echo "== [$(($(date +%s) - start))s] $name (at most ${limit}s): $*" | tee -a "$log"
  if ((DRY)); then
    printf '%s\t0\t0\n' "$name" >>"$steps"
    return
  fi
  if ((limit < 5)); then
    printf '%s\t124\t0\n' "$name" >>"$steps"
    echo "   not started: the ${budget}s budget is spent" | tee -a "$log"
    return
  fi
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  printf '%s\t%d\t%d\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$steps"
  echo "   rc=$rc after $(($(date +%s) - t0))s" | tee -a "$log"
}

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
# This GPU only (plus its PTX, _build.with_ptx); on 9.0 the arch-specific 9.0a, where the wgmma.sp kernel is.
archs="$arch"
[[ "$arch" == "9.0" ]] && archs="9.0a"
export TORCH_CUDA_ARCH_LIST="$archs"
export PYPRUNE_FAST_CACHE="$work/jit-cache" # the AOT build below must be what gets loaded
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
sanitizer="$CUDA_HOME/bin/compute-sanitizer"
[[ -x "$sanitizer" ]] || sanitizer=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")

# Every op once on small shapes (odd sizes, several tensors, ties), for compute-sanitizer. The caching
# allocator is off under it (PYTORCH_NO_CUDA_MEMORY_CACHING) so that out-of-bounds accesses hit unallocated
# memory; svd_mean (cuSOLVER's kernels, not ours) is left to memcheck.
cat >"$work/sanitize.py" <<'PY'
import os
import sys

import torch

from pyprune_fast import masks, ops

tool = sys.argv[1]
torch.manual_seed(0)
dev = "cuda"
xs = [torch.randn(s, device=dev) for s in [(37,), (65, 33), (1,), (70_001,)]]
xs.append(torch.full((3000,), 0.5, device=dev))
scores = {f"t{i}": x for i, x in enumerate(xs)}
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    typed = [x.to(dtype) for x in xs]
    total = sum(x.numel() for x in typed)
    for schedule in ("compact", "full"):  # the candidate compaction (its fallback: the full passes) and without
        os.environ["PYPRUNE_FAST_SELECT_PATH"] = schedule
        for k in (1, total // 2, total):
            ops.kth_smallest(typed, k)
        masks.layerwise({f"t{i}": x for i, x in enumerate(typed)}, 0.3)  # one selection per tensor, n = 1 too
    os.environ.pop("PYPRUNE_FAST_SELECT_PATH")
    ops.radix_histogram(typed, 0, 0)
    masks.global_unstructured({f"t{i}": x for i, x in enumerate(typed)}, 0.5)
    masks.per_row({f"t{i}": x for i, x in enumerate(typed)}, 0.3)
params = {n: x.clone() for n, x in scores.items()}
masks.global_unstructured(scores, 0.7, apply_to=params)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    g = [torch.randn(s, device=dev, dtype=dtype) for s in [(37,), (65, 33), (70_001,)]]
    ops.saliency(g, [x * 2 for x in g])
    masks.n_m({"a": torch.randn(64, 36, device=dev, dtype=dtype), "b": torch.randn(4, 8, device=dev, dtype=dtype)}, 2, 4)
    for out in (64, 128):  # out % 128 == 0: the wgmma.sp kernel on 9.0 (decode with split K, 64 and 128 tiles)
        w = torch.randn(out, 1024, device=dev, dtype=dtype) * masks.n_m({"w": torch.rand(out, 1024, device=dev)}, 2, 4)["w"]
        values, meta = ops.compress_24(w)
        ops.decompress_24(values, meta)
        if dtype != torch.float32:
            for tokens in (1, 17, 130):
                x = torch.randn(tokens, 1024, device=dev, dtype=dtype)
                ops.sparse24_linear(x, values, meta, torch.randn(out, device=dev, dtype=dtype), "gelu")
if tool == "memcheck":
    f = torch.randn(3, 8, 40, device=dev, requires_grad=True)
    ops.svd_mean(f).sum().backward()
torch.cuda.synchronize()
print(f"{tool}: every op ran")
PY

# CUDA-event timing of every op: per case and implementation, a warm-up call, then the median over 3 runs
# of enough back-to-back calls to fill ~0.1 s (at least 3, at most 200), timed by events on the stream.
# GB/s (the case's bytes_moved) and, for sparse24_linear, dense-equivalent TFLOP/s; each against the
# device's peak: memory bandwidth from its memory clock and bus width, dense fp16 tensor-core FLOP/s from
# SM count x SM clock x FLOP per SM per clock (2048 on sm_80, 4096 on sm_90; 2:4 doubles it).
cat >"$work/timing.py" <<'PY'
import json
import os
import statistics
import sys
import time

import torch

from pyprune_fast import masks, ops
from pyprune_fast.bench import nm_mask, saliency, select, sparse24, svd_mean
from pyprune_fast.bench.harness import Case

out = sys.argv[1]
props = torch.cuda.get_device_properties(0)
peak_bw = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
flop_per_clock = {(8, 0): 2048, (9, 0): 4096}.get((props.major, props.minor), 1024)
peak_flops = props.multi_processor_count * props.clock_rate * 1e3 * flop_per_clock
rows = []
device = {"name": props.name, "sms": props.multi_processor_count, "sm_clock_mhz": props.clock_rate / 1e3,
          "peak_bandwidth_gbs": peak_bw / 1e9, "peak_dense_fp16_tflops": peak_flops / 1e12}


def save():  # after every timing (atomically), so that a step cut by its timeout keeps what it measured
    with open(out + ".tmp", "w") as f:
        json.dump({"device": device, "timings": rows}, f, indent=1)
    os.replace(out + ".tmp", out)


def time_events(fn):
    fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    iters = max(3, min(200, int(0.1 / max(begin.elapsed_time(end) / 1e3, 1e-6))))
    runs = []
    for _ in range(3):
        begin.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        runs.append(begin.elapsed_time(end) / 1e3 / iters)
    return statistics.median(runs), iters


def measure(case, impls=None, flops=0):
    fns = {"ours": case.ours, **case.baselines}
    for impl, fn in fns.items():
        if impls is not None and impl not in impls:
            continue
        t0 = time.time()
        try:
            seconds, iters = time_events(fn)
        except Exception as exc:  # a baseline torch lacks on this GPU: recorded, the others go on
            rows.append({"group": case.group, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:300]})
            save()
            continue
        row = {"group": case.group, "impl": impl, "seconds": seconds, "iterations": iters, **case.extra}
        if case.bytes_moved:
            row["gbs"] = case.bytes_moved / seconds / 1e9
            row["percent_of_peak_bandwidth"] = 100 * case.bytes_moved / seconds / peak_bw
        if flops:
            row["tflops"] = flops / seconds / 1e12
            row["percent_of_dense_peak_flops"] = 100 * flops / seconds / peak_flops
        rows.append(row)
        save()
        print(json.dumps(row), f"({time.time() - t0:.1f}s)", flush=True)
        torch.cuda.empty_cache()


# torch.kthvalue on one large CUDA slice runs in one block: compared at 16M, ours also at 128M.
measure(select.kth_case(16_000_000, 20, "cuda"))
measure(select.kth_case(128_000_000, 20, "cuda"), impls={"ours", "torch.topk(torch.cat)"})
measure(select.global_masks_case(128_000_000, 20, "cuda"), impls={"ours"})
measure(select.global_apply_case(64_000_000, 20, "cuda"), impls={"ours"})
# Candidate compaction against the full radix passes it replaces (PYPRUNE_FAST_SELECT_PATH): GB/s over one
# read of the scores, and the emulation's path and passes for the same inputs (goal: <= 1.3 passes for
# fp32, >= 70 % of peak bandwidth per pass). On 4-byte |N(0,1)| scores at 90 %, 2-byte scores (8 per
# 16-byte load), an already pruned model (half zeros: one shared add per warp) at a rank inside the
# zeros and above them, and per-row masks (one block per row) at LLaMA-7B's MLP shape.
gen = torch.Generator(device="cuda").manual_seed(0)
scores = [torch.randn(6_400_000, device="cuda", generator=gen).abs_() for _ in range(20)]
measure(select.kth_schedule_case(scores, 115_200_000, "128M fp32 |N(0,1)| at 90%"))
half = [x.half() for x in scores]
measure(select.kth_schedule_case(half, 64_000_000, "128M fp16 at 50%"))
pruned = [x * (torch.rand(6_400_000, device="cuda", generator=gen) > 0.5) for x in scores]
measure(select.kth_schedule_case(pruned, 32_000_000, "128M fp32 half zeros at 25%"))
measure(select.kth_schedule_case(pruned, 96_000_000, "128M fp32 half zeros at 75%"))
row_scores = {"w": torch.rand(11008, 4096, device="cuda", generator=gen)}
measure(Case("per_row masks 11008x4096 fp32 cuda", lambda: masks.per_row(row_scores, 0.5),
             {"torch.topk per row": lambda: torch.topk(row_scores["w"], 2048, dim=1, largest=False)},
             bytes_moved=11008 * 4096 * 5))
del scores, half, pruned, row_scores
for dtype in (torch.float32, torch.bfloat16):
    measure(saliency.saliency_case("cuda", dtype))
measure(nm_mask.n_m_case("llama_7b_layer", "cuda", torch.float32), impls={"ours", "torch topk"})
measure(sparse24.compress_case("llama_7b", "cuda", torch.float16))
# On 9.0 "ours" is forced onto the wgmma.sp kernel (an error row if it cannot run) and the mma.sp kernel
# is timed beside it.
hopper = (props.major, props.minor) == (9, 0)
for tokens in (1, 16, 2048, 8192):
    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008)):
        case = sparse24.sparse24_linear_case(out_f, in_f, tokens, torch.float16, "cuda")
        os.environ["PYPRUNE_FAST_SPARSE24_KERNEL"] = "wgmma_sp" if hopper else "auto"
        measure(case, flops=2 * tokens * out_f * in_f)
        if hopper:
            os.environ["PYPRUNE_FAST_SPARSE24_KERNEL"] = "mma_sp"
            ampere = Case(case.group + " mma_sp kernel", case.ours, {}, bytes_moved=case.bytes_moved)
            measure(ampere, flops=2 * tokens * out_f * in_f)
os.environ.pop("PYPRUNE_FAST_SPARSE24_KERNEL")
measure(svd_mean.svd_mean_case(12, 64, 197 * 768, as_list=False, device="cuda"))
PY

if ((DRY)); then # the scripts above must at least compile
  "$PY" -m py_compile "$work/sanitize.py" "$work/timing.py" || exit 1
fi
pytest=(-p no:cacheprovider -q)
run build 270 "$PY" setup.py build_ext --inplace
run backend 30 "$PY" -c '
import torch, pyprune_fast
from pyprune_fast import _extension
info = pyprune_fast.backend_info()
print(info)
assert info["backend"] == "native" and info["cuda_ops"], "the CUDA kernels were not loaded"
assert _extension.cuda_kernel_fits("saliency", torch.device("cuda")), "no kernel image for this GPU"'
run cuda-tests 120 "$PY" -m pytest tests -m cuda --maxfail=20 "${pytest[@]}" --junitxml="$work/tests.xml"
run memcheck 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 \
  --print-limit 20 "$PY" "$work/sanitize.py" memcheck
run racecheck 45 "$sanitizer" --tool racecheck --error-exitcode 1 --print-limit 20 "$PY" "$work/sanitize.py" racecheck
run timing 100 "$PY" "$work/timing.py" "$work/timing.json"

# One results file: the device, every step's status and time, the test counts and the timings. Run in the
# dry run too (it then writes into a temporary folder).
echo "== [$(($(date +%s) - start))s] summary: $base.json" | tee -a "$log"
timeout 30 "$PY" - "$work" "$base.json" "$gpu" "$arch" >>"$log" 2>&1 <<'PY' || printf 'summary\t1\t0\n' >>"$steps"
import json, os, sys, time
import xml.etree.ElementTree as ET

work, out, gpu, arch = sys.argv[1:]
doc = {"gpu": gpu, "arch": arch, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": []}
with open(os.path.join(work, "steps.tsv")) as f:
    for line in f:
        name, rc, seconds = line.rstrip("\n").split("\t")
        doc["steps"].append({"name": name, "rc": int(rc), "seconds": int(seconds)})
try:
    import torch, pyprune_fast

    doc["backend"] = {k: v for k, v in pyprune_fast.backend_info().items() if k != "ops"}
    props = torch.cuda.get_device_properties(0)
    doc["device"] = {"name": props.name, "memory_gb": props.total_memory / 1e9}
except Exception as exc:  # the dry run, or a broken build: the steps above say why
    doc["device"] = {"error": f"{type(exc).__name__}: {exc}"}
if os.path.exists(os.path.join(work, "tests.xml")):
    suite = ET.parse(os.path.join(work, "tests.xml")).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    doc["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
doc["timings"] = []
if os.path.exists(os.path.join(work, "timing.json")):
    with open(os.path.join(work, "timing.json")) as f:
        timing = json.load(f)
    doc["device"].update(timing["device"])
    doc["timings"] = timing["timings"]
with open(out, "w") as f:
    json.dump(doc, f, indent=1)
print(f"{out}: {len(doc['steps'])} steps, {len(doc['timings'])} timings, tests {doc.get('tests')}")
PY

failed=$(awk -F'\t' '$2 != 0 {print $1}' "$steps" | tr '\n' ' ')
echo "== [$(($(date +%s) - start))s] done: $base.json, log $log${failed:+; FAILED: $failed}" | tee -a "$log"
[[ -z "$failed" ]]
