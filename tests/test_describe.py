"""The describe job and the catalog end to end on a tiny random model: cache -> describe -> catalog."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.models import random_model
from featureatlas.activation_store.store import write_store
from featureatlas.eval.adapters import NeuronDictionary
from featureatlas.eval.cache import CacheConfig, FeatureCache, build_cache
from featureatlas.eval.describe import DescribeConfig, choose_features, describe, parse_features
from featureatlas.eval.outputs import TokenChangeConfig
from featureatlas.eval.schema import validate_record

HOOK = "mlp_hidden.1"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("d")
    lm = random_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=24, vocab_size=300, seed=1)
    rng = np.random.default_rng(0)
    N, T = 24, 16
    tokens = rng.integers(3, 260, size=(N, T)).astype(np.int32)
    tokens[:, 0] = lm.config.bos_id
    _, cap = lm.forward(lm.params, jnp.asarray(tokens), capture=(HOOK,))
    acts = np.asarray(cap[HOOK], np.float32).reshape(N * T, -1)
    store = write_store(tmp / "s.h5", acts={HOOK: acts}, tokens=tokens, attrs={"model_id": lm.model_id})
    dic = NeuronDictionary.for_model(lm, HOOK)
    cfg = CacheConfig(top_n=4, n_quantiles=3, per_bin=2, n_negative=2, contexts_per_chunk=8, hist_stride=1)
    cache = FeatureCache(build_cache(store, dic, cfg, tmp / "cache", dictionary_id=f"neurons:{HOOK}", progress=False))
    return lm, store, dic, cache, tmp


def test_describe_writes_valid_records_for_every_feature(pipeline):
    lm, store, dic, cache, tmp = pipeline
    cfg = DescribeConfig(features="0-3,7", methods=("maxact", "vocabproj", "tokenchange", "ensemble-concat"), window=6)
    tc = TokenChangeConfig(n_seq=4, seq_len=8, feature_batch=4)
    info = {"name": "neurons", "kind": "neurons", "hook": HOOK, "hook_out": HOOK, "n_features": dic.n_features}
    res = describe(store, lm, dic, cache, cfg, tc, tmp / "desc", info=info, progress=False)
    recs = [json.loads(line) for line in (tmp / "desc" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == dic.n_features and [r["index"] for r in recs] == list(range(dic.n_features))
    for r in recs:
        validate_record(r)
    chosen = [r for r in recs if r["index"] in (0, 1, 2, 3, 7)]
    for r in chosen:
        if r["dead"]:
            assert r["descriptions"] == []
            continue
        assert r["examples"]["top"] and r["vocab_proj"]["top"] and r["token_change"]["pos"]["up"]
        assert {d["method"] for d in r["descriptions"]} == {"maxact", "vocabproj", "tokenchange", "ensemble-concat"}
        assert all(d["explainer"] == "template" for d in r["descriptions"])
        ex = r["examples"]["top"][0]
        top_c, top_v = cache.examples(r["index"])["top"][0]  # explain split only
        assert ex["context"] == top_c
        assert abs(ex["acts"][ex["max_pos"]] - top_v) < 1e-4 * max(1, top_v) and top_v <= r["stats"]["max"] + 1e-6
    assert all(not r["descriptions"] and not r["examples"]["top"] for r in recs if r["index"] not in (0, 1, 2, 3, 7))
    assert res["n_failed"] == 0 and sorted(res["described"] + res["dead_chosen"]) == [0, 1, 2, 3, 7]
    # a rerun with --resume reuses the evidence and adds nothing
    again = describe(store, lm, dic, cache, cfg, tc, tmp / "desc", info=info, resume=True, progress=False)
    assert again["n_new"] == 0
    # another explainer (an OpenAI-compatible endpoint on loopback) into the same run adds its descriptions
    from test_explainers import KEY, KEY_ENV, FakeLLM

    server = FakeLLM()
    try:
        import os

        os.environ[KEY_ENV] = KEY
        http_cfg = DescribeConfig(features=cfg.features, window=cfg.window, methods=("maxact",), explainer="openai",
                                  base_url=server.url, api_model="fake", api_key_env=KEY_ENV)
        more = describe(store, lm, dic, cache, http_cfg, tc, tmp / "desc", info=info, resume=True, progress=False)
    finally:
        os.environ.pop(KEY_ENV, None)
        server.close()
    assert more["n_new"] == len(more["described"]) == server.chat_requests and more["n_failed"] == 0
    recs = {json.loads(line)["index"]: json.loads(line)
            for line in (tmp / "desc" / "records.jsonl").read_text().splitlines()}
    live = more["described"][0]
    got = {(d["explainer"], d["method"]) for d in recs[live]["descriptions"]}
    assert {("openai", "maxact"), ("template", "maxact"), ("template", "ensemble-concat")} <= got
    assert all(KEY not in p.read_text(errors="ignore") for p in (tmp / "desc").rglob("*") if p.is_file())

    from featureatlas.scripts.cmd_catalog import CatalogJob, build

    result = build(CatalogJob(describe=(str(tmp / "desc"),), out=str(tmp / "catalog")))
    assert result.n_features == dic.n_features and result.index_html.exists()
    lines = result.features_jsonl.read_text().splitlines()
    assert len(lines) == dic.n_features


def test_feature_selection_and_bad_ids(pipeline):
    lm, store, dic, cache, tmp = pipeline
    assert parse_features("3, 5-7,1") == [3, 5, 6, 7, 1]
    with pytest.raises(ConfigError, match="'x' is not a feature id"):
        parse_features("1,x")
    sample = choose_features(DescribeConfig(sample=5, sample_seed=1), cache)
    assert len(sample) == 5 and not cache.dead[sample].any()
    assert (sample == choose_features(DescribeConfig(sample=5, sample_seed=1), cache)).all()
    info = {"name": "n", "kind": "neurons", "hook": HOOK, "n_features": dic.n_features}
    with pytest.raises(Exception, match=r"out of range.*ids 0\.\.23"):
        describe(store, lm, dic, cache, DescribeConfig(features="2,99"), TokenChangeConfig(), tmp / "bad", info=info)
    with pytest.raises(ConfigError, match="--methods 'maxact2'"):
        describe(store, lm, dic, cache, DescribeConfig(methods=("maxact2",)), TokenChangeConfig(), tmp / "bad",
                 info=info)
    with pytest.raises(ConfigError, match="--base-url"):
        DescribeConfig(explainer="openai").validate()
    assert not (tmp / "bad").exists()
