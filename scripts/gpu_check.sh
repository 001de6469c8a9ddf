#!/usr/bin/env bash
# The accelerator checks of issue 11 in one go, for a GPU machine without network that already has a
# CUDA build of jax: the HLO check of the TopK/BatchTopK steps, the SAE training benchmark at both
# presets (small, gemma2b) and both dtypes (float32, bfloat16), and the harvest forward (bench_lm,
# SmolLM2-135M shape, batch 256x128) in both compute dtypes, beside transformers' bf16 forward of the
# same shape when torch with CUDA is installed, in under 8 minutes.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default ./gpu_results; PYTHON=... picks the interpreter)
#
# Writes into OUT_DIR: devices.txt, hlo_check.json, bench_<preset>_<dtype>.json (each rewritten after
# every architecture, so a stage cut short keeps what it measured), lm_<dtype>.json, lm_hf_bf16.json,
# and log.txt. The only install it may do is `pip install --no-deps -e .` when featureatlas is not
# importable yet.
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
# 3. Harvest forward: ours in float32 and bfloat16, then transformers' bf16 at the same shape (random
#    weights, the 16 layers a resid_post.15 harvest runs, sdpa attention) when torch sees a GPU.
for dtype in float32 bfloat16; do
  stage 40 "$PY" -m featureatlas.scripts.bench_lm --batch 256 --ctx 128 --steps 10 --dtype "$dtype" \
    --out "$OUT/lm_${dtype}.json"
done
if "$PY" -c "import sys, torch, transformers; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  stage 40 "$PY" - "$OUT/lm_hf_bf16.json" <<'PYEOF'
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaModel
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=16, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                  max_position_embeddings=8192, tie_word_embeddings=True)
cfg._attn_implementation = "sdpa"
torch.set_default_dtype(torch.bfloat16)  # as from_pretrained(dtype=torch.bfloat16) builds it
model = LlamaModel(cfg).cuda().eval()
ids = torch.randint(3, cfg.vocab_size, (256, 128), device="cuda")
times = []
with torch.no_grad():
    for i in range(13):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        model(input_ids=ids)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
best = min(times[3:])
r = {"benchmark": "hf_lm_forward", "dtype": "bfloat16", "batch": 256, "ctx": 128, "layers": 16,
     "device": torch.cuda.get_device_name(), "torch": torch.__version__,
     "tokens_per_s": round(256 * 128 / best, 1), "best_s": round(best, 5)}
json.dump(r, open(sys.argv[1], "w"))
print(json.dumps(r))
PYEOF
else
  say "skipped transformers' bf16 forward: no torch + transformers with CUDA here"
fi

# 2b. The small SAE preset, with what time is left.
for dtype in float32 bfloat16; do
  stage 55 "$PY" -m featureatlas.scripts.bench_sae --preset small --dtype "$dtype" \
    --archs topk,batchtopk --legacy topk --no-ops --steps 10 --warmup 2 --timeout 50 \
    --out "$OUT/bench_small_${dtype}.json"
done

# 4. One line per result.
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
for path in sorted(glob.glob(os.path.join(out, "lm_*.json"))):
    r = json.load(open(path))
    if "per_batch" in r:
        b = next(iter(r["per_batch"].values()))
        print(f"{os.path.basename(path)}: {r['device']} {r['dtype']} {r['tokens_per_s']:.0f} tok/s "
              f"(median {b['tokens_per_s_median']:.0f}, first call {b['first_call_s']} s) "
              f"matmul efficiency {r['matmul_efficiency']} of {r['machine_matmul_gflops']} GFLOP/s fp32")
    else:
        print(f"{os.path.basename(path)}: {r['device']} transformers {r['dtype']} {r['tokens_per_s']:.0f} tok/s")
path = os.path.join(out, "hlo_check.json")
if os.path.exists(path):
    for x in json.load(open(path))["results"]:
        flags = {k: x[k] for k in ("while_loop", "full_width_sort", "full_width_topk", "bf16_scatter", "materialised_BkD")}
        print(f"hlo {x['preset']} {x['arch']} {x['dtype']} {x['impl']}: {flags}")
EOF
say "done in ${SECONDS}s; results in $OUT"
