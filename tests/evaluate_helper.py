"""A tiny, deterministic evaluate pipeline (random model, neurons, cache, template descriptions), shared by
tests/test_evaluate.py and its SIGKILL test, which runs this file as a separate process:

    python tests/evaluate_helper.py WORK_DIR OUT_DIR      # builds WORK_DIR if needed, then evaluates into OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HOOK = "mlp_hidden.1"


def tiny_model():
    from featureatlas.activation_store.models import random_model

    return random_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=24, vocab_size=300, seed=1)


def build(work: Path) -> Path:
    """The describe run directory of 6 neurons (built once in `work`)."""
    import jax.numpy as jnp

    from featureatlas.activation_store.store import ActivationStore, write_store
    from featureatlas.eval.adapters import NeuronDictionary
    from featureatlas.eval.cache import CacheConfig, FeatureCache, build_cache
    from featureatlas.eval.describe import DescribeConfig, describe
    from featureatlas.eval.outputs import TokenChangeConfig

    work = Path(work)
    desc = work / "desc"
    if (desc / "records.jsonl").exists():
        return desc
    work.mkdir(parents=True, exist_ok=True)
    lm = tiny_model()
    rng = np.random.default_rng(0)
    N, T = 48, 16
    tokens = rng.integers(3, 260, size=(N, T)).astype(np.int32)
    tokens[:, 0] = lm.config.bos_id
    _, cap = lm.forward(lm.params, jnp.asarray(tokens), capture=(HOOK,))
    acts = np.asarray(cap[HOOK], np.float32).reshape(N * T, -1)
    labels = np.arange(N) % 2
    path = work / "s.h5"
    store = ActivationStore.open(path) if path.exists() else write_store(
        path, acts={HOOK: acts}, tokens=tokens, labels=labels, label_names=("even", "odd"),
        attrs={"model_id": lm.model_id})
    dic = NeuronDictionary.for_model(lm, HOOK)
    cfg = CacheConfig(top_n=4, n_quantiles=2, per_bin=3, n_negative=3, contexts_per_chunk=8, hist_stride=1)
    cache = FeatureCache(build_cache(store, dic, cfg, work / "cache", dictionary_id=f"neurons:{HOOK}",
                                     progress=False, overwrite=True))
    info = {"name": "neurons", "kind": "neurons", "hook": HOOK, "hook_out": HOOK, "n_features": dic.n_features,
            "path": f"neurons:{HOOK}", "level": 0}
    describe(store, lm, dic, cache, DescribeConfig(features="0-5", methods=("maxact", "vocabproj"), window=6),
             TokenChangeConfig(n_seq=4, seq_len=8, feature_batch=4), desc, info=info, progress=False)
    return desc


def protocols():
    from featureatlas.eval.cheap import CheapConfig
    from featureatlas.eval.input_eval import InputEvalConfig
    from featureatlas.eval.output_eval import OutputEvalConfig, SteeringEvalConfig
    from featureatlas.eval.scoring import ScoringConfig

    return {"scoring": ScoringConfig(width=6, n_top=3, per_quantile=2, n_random=3, n_hard=2),
            "cheap": CheapConfig(n_top=4, min_examples=1),
            "input": InputEvalConfig(m=4),
            "output": OutputEvalConfig(prompts=("ab",), n_new=3, iters=6, hi=50.0),
            "steering": SteeringEvalConfig(targets=(0.05,), n_samples=2, n_new=3, iters=6, hi=50.0, n_baseline=4)}


def run(work: Path, out: Path, *, resume: bool = False, evaluations=("cheap", "embedding", "input", "output"),
        load_model=None, judges=None, block: int = 1, protocols_=None):
    from featureatlas.eval.evaluate import EvaluateConfig, evaluate, load_subjects

    desc = build(work)
    cfg = EvaluateConfig(evaluations=tuple(evaluations), judges=("embedding",), block=block, bootstrap=50)
    return evaluate(load_subjects([str(desc)]), cfg, protocols_ or protocols(), out, resume=resume, progress=False,
                    load_model=load_model or tiny_model, judges=judges)


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]), resume=True)
