#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/README.md, "GPU check"): for the first session that gets a device,
# within 8 minutes of an H100/H200 including the build. Builds the library for this GPU's arch only, runs
# every CUDA test (pytest -m cuda) and the CUDA benchmarks (pytest benchmarks -k cuda), and writes
# benchmarks/results/gpu-<gpu>-<date>.json with a .log beside it. Every step has its own timeout, so one
# hang cannot eat the budget; the exit status is 1 when any step failed. Needs the project's test
# dependencies (README.md) and nvcc (CUDA_HOME, default /usr/local/cuda).
#   benchmarks/gpu_check.sh            run it
#   benchmarks/gpu_check.sh --dry-run  print the steps and run the summary step, without a GPU
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY="${PYTHON:-python}"
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--dry-run]" >&2
  exit 2
fi
start=$(date +%s)
work=$(mktemp -d)

if ((DRY)); then
  gpu="dry run" arch="9.0"
else
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
  if [[ -z "$arch" ]]; then  # older drivers have no compute_cap field
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

# run NAME TIMEOUT_S COMMAND...: one step, its output appended to the log, its status and time recorded.
run() {
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "== [$(($(date +%s) - start))s] $name (at most ${limit}s): $*" | tee -a "$log"
  if ((DRY)); then
    printf '%s\t0\t0\n' "$name" >>"$steps"
    return
  fi
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  printf '%s\t%d\t%d\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$steps"
  echo "   rc=$rc after $(($(date +%s) - t0))s" | tee -a "$log"
}

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="$arch"           # this GPU only (plus its PTX, _build.with_ptx)
export PYPRUNE_FAST_CACHE="$work/jit-cache"   # the AOT build below must be what gets loaded
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
bench=(-p no:cacheprovider --benchmark-only --benchmark-disable-gc -q)

run build 240 "$PY" setup.py build_ext --inplace
run backend 30 "$PY" -c '
import torch, pyprune_fast
from pyprune_fast import _extension
info = pyprune_fast.backend_info()
print(info)
assert info["backend"] == "native" and info["cuda_ops"], "the CUDA kernels were not loaded"
assert _extension.cuda_kernel_fits("saliency", torch.device("cuda")), "no kernel image for this GPU"'
run cuda-tests 150 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --junitxml="$work/tests.xml"
run bench-saliency-select-nm-compress 75 "$PY" -m pytest benchmarks/bench_saliency.py benchmarks/bench_select.py \
  benchmarks/bench_sparse24.py -k "cuda and not sparse24_linear" "${bench[@]}" --benchmark-json="$work/bench-1.json"
run bench-svd_mean 45 "$PY" -m pytest benchmarks/bench_svd_mean.py -k cuda "${bench[@]}" \
  --benchmark-json="$work/bench-2.json"
run bench-sparse24_linear 90 "$PY" -m pytest benchmarks/bench_sparse24.py \
  -k "sparse24_linear_cuda and fp16 and (4096x4096 or 11008x4096 or 4096x11008)" "${bench[@]}" \
  --benchmark-json="$work/bench-3.json"

# One results file: the device, every step's status and time, the test counts, and each benchmark's median
# with its throughput against the GPU's peak memory bandwidth (from its memory clock and bus width). Run in
# the dry run too (it then writes into a temporary folder).
echo "== [$(($(date +%s) - start))s] summary: $base.json" | tee -a "$log"
timeout 60 "$PY" - "$work" "$base.json" "$gpu" "$arch" >>"$log" 2>&1 <<'PY' || printf 'summary\t1\t0\n' >>"$steps"
import glob, json, os, sys, time
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
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    peak = 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None
    doc["device"] = {"name": props.name, "memory_gb": props.total_memory / 1e9, "peak_bandwidth_gbs": peak and peak / 1e9}
except Exception as exc:  # the dry run, or a broken build: the steps above say why
    peak = None
    doc["device"] = {"error": f"{type(exc).__name__}: {exc}"}
if os.path.exists(os.path.join(work, "tests.xml")):
    suite = ET.parse(os.path.join(work, "tests.xml")).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    doc["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
doc["benchmarks"] = []
for path in sorted(glob.glob(os.path.join(work, "bench-*.json"))):
    with open(path) as f:
        runs = json.load(f)
    doc.setdefault("machine_info", runs.get("machine_info"))
    for b in runs["benchmarks"]:
        extra, median = b.get("extra_info", {}), b["stats"]["median"]
        row = {"group": b["group"], "impl": extra.get("impl"), "median_s": median, "extra": extra}
        if extra.get("bytes"):
            row["gbs"] = extra["bytes"] / median / 1e9
            if peak:
                row["percent_of_peak_bandwidth"] = 100 * extra["bytes"] / median / peak
        doc["benchmarks"].append(row)
with open(out, "w") as f:
    json.dump(doc, f, indent=1)
print(f"{out}: {len(doc['steps'])} steps, {len(doc['benchmarks'])} benchmarks, tests {doc.get('tests')}")
PY

failed=$(awk -F'\t' '$2 != 0 {print $1}' "$steps" | tr '\n' ' ')
echo "== [$(($(date +%s) - start))s] done: $base.json, log $log${failed:+; FAILED: $failed}" | tee -a "$log"
[[ -z "$failed" ]]
