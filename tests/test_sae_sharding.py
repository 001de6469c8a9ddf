"""Training on a (data, feature) mesh of 8 simulated CPU devices equals training on one device."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the device count must be fixed before jax is imported.
SCRIPT = r"""
import json, sys, tempfile
import numpy as np
import jax
from featureatlas.saes import SAEConfig, SAETrainConfig
from featureatlas.saes.sources import ArrayBatches
from featureatlas.saes.trainer import train_saes

assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
dirs = rng.normal(size=(96, 32)); dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
codes = rng.uniform(0.5, 2.0, size=(4096, 96)) * (rng.random((4096, 96)) < 0.05)
x = (codes @ dirs + 0.3).astype(np.float32)
archs = ["topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated"]
out = {}
for data, feature in [(1, 1), (2, 4)]:
    tcfg = SAETrainConfig(batch_size=256, total_tokens=256 * 25, warmup_steps=3, log_every=5, checkpoint_every=0,
                       geometric_median_samples=512, mesh_data=data, mesh_feature=feature)
    cfgs = [SAEConfig(architecture=a, width=128, k=4, hook_in="h", lr=2e-3, dead_tokens=1024, k_aux=16,
                      matryoshka_prefixes=(32, 128)) for a in archs]
    r = train_saes(cfgs, tcfg, ArrayBatches({"h": x}), tempfile.mkdtemp(), progress=False)
    enc = r.state.saes[0].params["enc_FxD"]
    out[f"{data}x{feature}"] = {
        "spec": str(enc.sharding.spec), "n_shards": len(enc.addressable_shards),
        "params": [{k: np.asarray(v).tolist() for k, v in s.params.items()} for s in r.saes],
        "l0": [r.last_metrics[n]["l0"] for n in r.names],
    }
print(json.dumps(out))
"""


def test_one_device_and_eight_device_mesh_train_the_same_saes():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    one, mesh = res["1x1"], res["2x4"]
    assert mesh["n_shards"] == 8 and "feature" in mesh["spec"]  # encoder rows really are split
    assert one["l0"] == mesh["l0"] or all(abs(a - b) < 1e-3 * max(1, a) for a, b in zip(one["l0"], mesh["l0"]))
    for p1, p8 in zip(one["params"], mesh["params"]):
        for name in p1:
            a, b = np.asarray(p1[name]), np.asarray(p8[name])
            assert abs(a - b).max() <= 1e-4 * max(1.0, abs(a).max()), name
