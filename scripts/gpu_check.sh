#!/usr/bin/env bash
# The accelerator checks of issue 11 in one go, for a GPU machine without network that already has a
# CUDA build of jax: the HLO check of the TopK/BatchTopK steps and the SAE training benchmark at both
# presets (small, gemma2b) and both dtypes (float32, bfloat16), in under 8 minutes.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default ./gpu_results; PYTHON=... picks the interpreter)
#
# Writes into OUT_DIR: devices.txt, hlo_check.json, bench_<preset>_<dtype>.json (each rewritten after
# every architecture, so a stage cut short keeps what it measured), and log.txt. The only install it
# may do is `pip install --no-deps -e .` when featureatlas is not importable yet.
set -uo pipefail

OUT="${1:-./gpu_results}"
PY="${PYTHON:-python}"
BUDGET="${BUDGET_S:-465}"  # seconds for everything; stages get what is left, capped
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 1
LOG="$OUT/log.txt"
: > "$LOG"
SECONDS=0

say() { echo "[$(printf '%3d' "$SECONDS")s] $*" | tee -a "$LOG"; }

# Runs "$@" with at most min(cap, budget left) seconds; skipped when under 20 s are left.
stage() {
  local cap="$1"; shift
  local left=$((BUDGET - SECONDS))
  local t=$(( cap < left ? cap : left ))
  if (( t < 20 )); then say "skipped (time budget spent): $*"; return 0; fi
  say "run (<= ${t}s): $*"
  timeout --signal=TERM --kill-after=5 "$t" "$@" >> "$LOG" 2>&1
  local rc=$?
  (( rc == 0 )) || say "exit $rc: $*"
  return 0
}

if ! "$PY" -c "import featureatlas" 2>/dev/null; then
  say "featureatlas not importable: pip install --no-deps -e ."
  "$PY" -m pip install --no-deps -e . >> "$LOG" 2>&1 || { say "install failed (see $LOG)"; exit 1; }
fi
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
} > "$OUT/devices.txt" 2>&1
cat "$OUT/devices.txt" | tee -a "$LOG"
"$PY" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" \
  || say "WARNING: jax sees no accelerator; the numbers below are CPU numbers"

# A rerun (or a later stage compiling the same program) reuses compiled programs.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}"

# 1. HLO of the compiled steps at the size that matters (fusion decisions depend on it).
stage 100 "$PY" -m featureatlas.scripts.hlo_check --preset gemma2b --archs topk,batchtopk \
  --dtypes float32,bfloat16 --out "$OUT/hlo_check.json"

# 2. Benchmarks: TopK (and the legacy TopK path, same run), BatchTopK, ReLU as the dense reference.
#    gemma2b first (the issue's targets are stated there), with the per-op breakdown; the small preset
#    without it and without ReLU. Each architecture gets at most 75 s.
for dtype in float32 bfloat16; do
  stage 125 "$PY" -m featureatlas.scripts.bench_sae --preset gemma2b --dtype "$dtype" \
    --archs topk,batchtopk,relu --legacy topk --steps 10 --warmup 2 --timeout 75 \
    --out "$OUT/bench_gemma2b_${dtype}.json"
done
for dtype in float32 bfloat16; do
  stage 55 "$PY" -m featureatlas.scripts.bench_sae --preset small --dtype "$dtype" \
    --archs topk,batchtopk --legacy topk --no-ops --steps 10 --warmup 2 --timeout 50 \
    --out "$OUT/bench_small_${dtype}.json"
done

# 3. One line per result.
"$PY" - "$OUT" <<'EOF' | tee -a "$LOG"
import glob, json, os, sys
out = sys.argv[1]
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    r = json.load(open(path))
    print(f"{os.path.basename(path)}: {r['device']} matmul {r['matmul_gflops']} GFLOP/s "
          f"complete={r.get('complete')} summary={json.dumps(r['summary'].get('topk_speedup_vs_legacy'))}/"
          f"{json.dumps(r['summary'].get('batchtopk_over_topk'))} (topk new/legacy, batchtopk/topk)")
    for x in r["results"]:
        if "error" in x:
            print(f"  {x['arch']:>10} {x['impl']:>6}: ERROR {x['error']}")
        else:
            print(f"  {x['arch']:>10} {x['impl']:>6}: {x['tokens_per_s']:>10.0f} tok/s {x['step_ms']:>8.2f} ms "
                  f"ops {x.get('ops_ms', {})}")
path = os.path.join(out, "hlo_check.json")
if os.path.exists(path):
    for x in json.load(open(path))["results"]:
        flags = {k: x[k] for k in ("while_loop", "full_width_sort", "full_width_topk", "bf16_scatter", "materialised_BkD")}
        print(f"hlo {x['preset']} {x['arch']} {x['dtype']} {x['impl']}: {flags}")
EOF
say "done in ${SECONDS}s; results in $OUT"
