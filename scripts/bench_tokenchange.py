"""TokenChange throughput: many features per forward (eval.outputs.token_change) against one feature per forward.

Features: the neurons of SmolLM2-135M's mlp_hidden.15 (NeuronDictionary, clamp ±10). Sequences: random
token ids with BOS first (speed does not depend on the text). Three ways to compute the same numbers:
  batched    token_change with --feature-batch features (×2 signs) per vmapped forward;
  unbatched  token_change with feature_batch=1 (one feature, both signs, per forward; same math);
  naive      per feature and sign one `lm.forward` with a clamp edit and full logits, mean over
             positions minus the clean mean (the clean forward once), top-k: the straightforward way.
The slower two run on --baseline-features features and are scaled per feature. The run checks that
batched and naive give the same top tokens. On 2 shared CPU cores the default sequences are smaller
than the paper's 32 x 32 (--n-seq / --seq-len). Prints one JSON object on the last line.

    .venv/bin/python scripts/bench_tokenchange.py [--features 256] [--n-seq 2] [--seq-len 16]
"""
from __future__ import annotations

import argparse

import numpy as np

from featureatlas.activation_store.models import clamp, load_model
from featureatlas.eval.adapters import NeuronDictionary
from featureatlas.eval.outputs import TokenChangeConfig, token_change
from featureatlas.scripts.benchlib import emit, llama_flops_per_token, matmul_gflops, peak_rss_mb, timed


def naive_token_change(lm, dic, toks, features, c: float, top: int):
    """One forward (full logits) per feature and sign; returns the +c top-up ids [F, top]."""
    hook, pos = dic.hook, np.arange(1, toks.shape[1])
    clean, _ = lm.forward(lm.params, toks)
    clean_mean = np.asarray(clean)[:, 1:].mean(axis=(0, 1))
    V = np.asarray(dic.directions_FxD)
    up = []
    for f in features:
        for sign in (1.0, -1.0):
            logits, _ = lm.forward(lm.params, toks, edits=[clamp(hook, V[f], sign * c, pos)])
            delta = np.asarray(logits)[:, 1:].mean(axis=(0, 1)) - clean_mean
            if sign > 0:
                up.append(np.argsort(-delta)[:top])
    return np.array(up)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="mlp_hidden.15")
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--n-seq", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--feature-batch", type=int, default=32)
    ap.add_argument("--baseline-features", type=int, default=8)
    ap.add_argument("--clamp", type=float, default=10.0)
    args = ap.parse_args()

    mm_before = matmul_gflops()
    lm, load_s = timed(lambda: load_model(args.model))
    dic = NeuronDictionary.for_model(lm, args.hook)
    rng = np.random.default_rng(0)
    toks = rng.integers(3, lm.config.vocab_size, size=(args.n_seq, args.seq_len)).astype(np.int32)
    toks[:, 0] = lm.config.bos_id
    cfg = TokenChangeConfig(n_seq=args.n_seq, seq_len=args.seq_len, clamp=args.clamp, feature_batch=args.feature_batch)
    feats = np.arange(args.features)
    base = feats[:args.baseline_features]

    # compile once per variant (reported apart), then time
    _, compile_batched = timed(lambda: token_change(lm, dic, toks, feats[:args.feature_batch], cfg))
    batched, t_batched = timed(lambda: token_change(lm, dic, toks, feats, cfg))
    one = cfg.replace(feature_batch=1)
    _, compile_unbatched = timed(lambda: token_change(lm, dic, toks, base[:1], one))
    _, t_unbatched = timed(lambda: token_change(lm, dic, toks, base, one))
    naive_token_change(lm, dic, toks, base[:1], args.clamp, cfg.top)  # compile
    naive_up, t_naive = timed(lambda: naive_token_change(lm, dic, toks, base, args.clamp, cfg.top))
    mm_after = matmul_gflops()

    agree = float(np.mean(naive_up == batched.pos_up_ids[:len(base)]))
    per_batched = t_batched / len(feats)
    per_unbatched = t_unbatched / len(base)
    per_naive = t_naive / len(base)
    layer = int(args.hook.split(".")[1])
    emit({
        "benchmark": "tokenchange", "model": args.model, "hook": args.hook, "features": int(len(feats)),
        "n_seq": args.n_seq, "seq_len": args.seq_len, "clamp": args.clamp, "mode": cfg.mode,
        "feature_batch": args.feature_batch, "tokens_per_forward": 2 * args.feature_batch * args.n_seq * args.seq_len,
        "baseline_features": int(len(base)), "model_load_s": round(load_s, 1),
        "compile_s": {"batched": round(compile_batched, 1), "unbatched": round(compile_unbatched, 1)},
        "batched_s": round(t_batched, 2), "features_per_s": round(1 / per_batched, 2),
        "unbatched_features_per_s": round(1 / per_unbatched, 2), "naive_features_per_s": round(1 / per_naive, 2),
        "ratio_vs_naive": round(per_naive / per_batched, 2), "ratio_vs_unbatched": round(per_unbatched / per_batched, 2),
        "flop_bound_ratio_vs_naive": round(_flop_ratio(lm.config, layer), 2),
        "top_ids_agree_with_naive": agree,
        "matmul_gflops": {"before": round(mm_before, 1), "after": round(mm_after, 1)},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })


def _flop_ratio(cfg, layer: int) -> float:
    """Matmul FLOPs per token of the naive way (all layers + unembedding) over the batched way (the
    layers after the edit only, no per-token unembedding): the CPU-bound limit of the speed-up."""
    naive = llama_flops_per_token(cfg, cfg.n_layers) + 2 * cfg.d_model * cfg.vocab_size
    # + the edited layer's down projection
    after = llama_flops_per_token(cfg, cfg.n_layers - layer - 1) + 2 * cfg.d_mlp * cfg.d_model
    return naive / after


if __name__ == "__main__":
    main()
