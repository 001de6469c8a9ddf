"""Language-model core: hook identities, edits, padding, KV-cache generation, HF round trip,
and agreement with an independent numpy reference written straight from HF tensor names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.activation_store.models import (
    LanguageModel, Sampling, add, clamp, params_hash, random_model, replace,
)
from featureatlas.activation_store.models.config import (
    HOOK_KINDS, TRANSFORMERLENS_HOOKS, from_transformerlens, to_transformerlens,
)

ARCHS = ("llama", "gpt2")
ATOL = 2e-5


@pytest.fixture(scope="module", params=ARCHS)
def lm(request):
    return random_model(request.param, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seed=1)


def _tokens(lm, B=2, T=10, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, lm.config.vocab_size, size=(B, T))
    toks[:, 0] = lm.config.bos_id
    return toks


def _all_hooks(lm):
    return lm.hook_names


def _close(a, b, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


# ---- independent numpy reference (HF layout, written without our code) ----------------

def _ref_logits(cfg, t, tokens):
    """Per-head, per-position numpy forward of one sequence from HF-named tensors."""
    x_in = np.asarray(tokens)
    T = len(x_in)
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

    def bias(name):
        return t[name].astype(np.float64) if name in t else 0.0

    if cfg.arch == "llama":
        def norm(x, w):
            return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w

        def rope(x, pos):  # x [T, E]
            freqs = cfg.rope_base ** (-np.arange(0, E, 2) / E)
            ang = np.outer(pos, freqs)
            cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
            rot = np.concatenate([-x[:, E // 2:], x[:, :E // 2]], -1)
            return x * cos + rot * sin

        x = t["model.embed_tokens.weight"][x_in].astype(np.float64)
        for i in range(cfg.n_layers):
            p = lambda n: t[f"model.layers.{i}.{n}"].astype(np.float64)  # noqa: E731
            h = norm(x, p("input_layernorm.weight"))
            q, k, v = (h @ p(f"self_attn.{n}_proj.weight").T + bias(f"model.layers.{i}.self_attn.{n}_proj.bias")
                       for n in "qkv")
            heads = []
            for hh in range(H):
                kh = hh // (H // K)
                qh = rope(q[:, hh * E:(hh + 1) * E], np.arange(T))
                khd = rope(k[:, kh * E:(kh + 1) * E], np.arange(T))
                s = qh @ khd.T / np.sqrt(E) + np.triu(np.full((T, T), -np.inf), 1)
                heads.append(softmax(s) @ v[:, kh * E:(kh + 1) * E])
            x = x + np.concatenate(heads, -1) @ p("self_attn.o_proj.weight").T
            h = norm(x, p("post_attention_layernorm.weight"))
            g, u = h @ p("mlp.gate_proj.weight").T, h @ p("mlp.up_proj.weight").T
            x = x + (g / (1 + np.exp(-g)) * u) @ p("mlp.down_proj.weight").T
        return norm(x, t["model.norm.weight"]) @ t.get("lm_head.weight", t["model.embed_tokens.weight"]).T

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * w + b

    def gelu(z):
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))

    x = (t["wte.weight"][x_in] + t["wpe.weight"][:T]).astype(np.float64)
    D = cfg.d_model
    for i in range(cfg.n_layers):
        p = lambda n: t[f"h.{i}.{n}"].astype(np.float64)  # noqa: E731
        qkv = ln(x, p("ln_1.weight"), p("ln_1.bias")) @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        heads = []
        for hh in range(H):
            q, k, v = (qkv[:, j * D + hh * E: j * D + (hh + 1) * E] for j in range(3))
            s = q @ k.T / np.sqrt(E) + np.triu(np.full((T, T), -np.inf), 1)
            heads.append(softmax(s) @ v)
        x = x + np.concatenate(heads, -1) @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = ln(x, p("ln_2.weight"), p("ln_2.bias"))
        x = x + gelu(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    return ln(x, t["ln_f.weight"], t["ln_f.bias"]) @ t["wte.weight"].T


def test_logits_match_numpy_reference(lm):
    toks = _tokens(lm, B=1, T=12)
    logits, _ = lm.forward(lm.params, toks)
    ref = _ref_logits(lm.config, lm.to_hf_tensors(), toks[0])
    _close(logits[0], ref, atol=1e-4)


def test_llama_untied_and_qkv_bias_match_reference():
    lm = random_model("llama", n_layers=2, tied_embeddings=False, qkv_bias=True, seed=3)
    t = lm.to_hf_tensors()
    assert "lm_head.weight" in t and "model.layers.0.self_attn.q_proj.bias" in t
    toks = _tokens(lm, B=1, T=9)
    logits, _ = lm.forward(lm.params, toks)
    _close(logits[0], _ref_logits(lm.config, t, toks[0]), atol=1e-4)


# ---- hooks ------------------------------------------------------------------------------

def test_hook_identities(lm):
    toks = _tokens(lm)
    _, a = lm.forward(lm.params, toks, capture=_all_hooks(lm))
    for L in range(lm.config.n_layers):
        _close(a[f"resid_mid.{L}"], a[f"resid_pre.{L}"] + a[f"attn_out.{L}"])
        _close(a[f"resid_post.{L}"], a[f"resid_mid.{L}"] + a[f"mlp_out.{L}"])
        W_down = lm.write_matrix(f"mlp_hidden.{L}")
        assert W_down.shape == (lm.config.d_mlp, lm.config.d_model)
        bias = lm.params["layers"][L].get("b_down", 0.0)  # GPT-2's c_proj has a bias
        _close(a[f"mlp_out.{L}"], a[f"mlp_hidden.{L}"] @ W_down + bias)
        if L + 1 < lm.config.n_layers:
            np.testing.assert_array_equal(a[f"resid_post.{L}"], a[f"resid_pre.{L + 1}"])
    for h in lm.hook_names:
        assert a[h].shape == (2, 10, lm.hook_dim(h))
    assert lm.write_matrix("resid_post.0") is None


def test_final_resid_unembeds_to_logits(lm):
    toks = _tokens(lm)
    logits, a = lm.forward(lm.params, toks, capture=(f"resid_post.{lm.config.n_layers - 1}",))
    _close(lm.unembed(a[f"resid_post.{lm.config.n_layers - 1}"]), logits, atol=1e-4)
    _close(lm.unembed(a[f"resid_post.{lm.config.n_layers - 1}"][0, 3]), logits[0, 3], atol=1e-4)
    assert lm.W_U.shape == (lm.config.d_model, lm.config.vocab_size)


def test_stop_at_capture_equals_full_pass(lm):
    toks = _tokens(lm)
    hooks = ("resid_post.0", "mlp_hidden.0", "attn_out.0")
    full_logits, full = lm.forward(lm.params, toks, capture=hooks)
    logits, part = lm.forward(lm.params, toks, capture=hooks, stop_at="capture")
    assert logits is None and full_logits is not None
    for h in hooks:
        np.testing.assert_allclose(part[h], full[h], atol=1e-6)


def test_unknown_hook_error_lists_valid_hooks(lm):
    with pytest.raises(ValueError, match=r"valid hooks: resid_pre\.0-1, attn_out\.0-1, resid_mid\.0-1.*mlp_out\.0-1"):
        lm.forward(lm.params, _tokens(lm), capture=("resid_post.7",))
    with pytest.raises(ValueError, match="unknown hook"):
        lm.hook_dim("mlp.0")
    with pytest.raises(ValueError, match="width 128"):
        lm.forward(lm.params, _tokens(lm), edits=[add("mlp_hidden.0", np.ones(64))])
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        lm.forward(lm.params, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="zero vector"):
        clamp("resid_pre.0", np.zeros(64), 1.0)
    with pytest.raises(ValueError, match="stop_at"):
        lm.forward(lm.params, _tokens(lm), stop_at="capture")


# ---- edits ------------------------------------------------------------------------------

def test_zero_add_and_identity_replace_change_nothing(lm):
    toks = _tokens(lm)
    base_logits, base = lm.forward(lm.params, toks, capture=lm.hook_names)
    zero = add("resid_mid.0", np.zeros(lm.config.d_model), alpha=3.0)
    ident = replace("mlp_hidden.1", lambda x: x)
    for edits in ([zero], [ident], [zero, ident]):
        logits, acts = lm.forward(lm.params, toks, capture=lm.hook_names, edits=edits)
        np.testing.assert_array_equal(logits, base_logits)
        for h in lm.hook_names:
            np.testing.assert_array_equal(acts[h], base[h])


@pytest.mark.parametrize("hook", ["resid_mid.0", "resid_pre.1", "mlp_hidden.0"])
def test_add_changes_exactly_downstream(lm, hook):
    toks = _tokens(lm, B=2, T=10)
    p, alpha = 4, 2.5
    v = np.random.default_rng(5).standard_normal(lm.hook_dim(hook)).astype(np.float32)
    _, base = lm.forward(lm.params, toks, capture=lm.hook_names)
    _, ed = lm.forward(lm.params, toks, capture=lm.hook_names, edits=[add(hook, v, alpha=alpha, positions=[p])])
    def idx(name):  # compute order of hook sites
        k, layer = name.split(".")
        return 6 * int(layer) + HOOK_KINDS_IN_BLOCK.index(k)

    for h in lm.hook_names:
        diff = np.abs(np.asarray(ed[h]) - np.asarray(base[h])).max(-1)  # [B, T]
        assert diff[:, :p].max() == 0, f"{h} changed before the edited position (causality)"
        # positions after p only learn of the edit through an attention between the edit and h
        mixed = any(idx(hook) < idx(f"attn_out.{l}") <= idx(h) for l in range(lm.config.n_layers))
        if idx(h) < idx(hook):
            assert diff.max() == 0, f"{h} is upstream of {hook} but changed"
        elif h == hook:
            _close(np.asarray(ed[h])[:, p] - np.asarray(base[h])[:, p], np.broadcast_to(alpha * v, (2, v.size)))
            assert diff[:, p + 1:].max() == 0
        elif mixed:
            assert (diff[:, p:] > 1e-6).all(), f"{h} downstream of {hook} did not change at positions >= {p}"
        else:
            assert (diff[:, p] > 1e-6).all() and diff[:, p + 1:].max() == 0, f"{h}: only position {p} may change"


# block order of hook sites (HOOK_KINDS in config.py is a naming list, not the compute order)
HOOK_KINDS_IN_BLOCK = ["resid_pre", "attn_out", "resid_mid", "mlp_hidden", "mlp_out", "resid_post"]
assert sorted(HOOK_KINDS_IN_BLOCK) == sorted(HOOK_KINDS)


def test_transformerlens_hook_names():
    assert tuple(TRANSFORMERLENS_HOOKS) == HOOK_KINDS
    assert to_transformerlens("resid_post.15") == "blocks.15.hook_resid_post"
    assert to_transformerlens("mlp_hidden.3") == "blocks.3.mlp.hook_post"
    for kind in HOOK_KINDS:
        for layer in (0, 7, 29):
            tl = to_transformerlens(f"{kind}.{layer}")
            assert tl.startswith(f"blocks.{layer}.") and from_transformerlens(tl) == f"{kind}.{layer}"
    for bad in ("hook_embed", "resid_post", "resid_post.x", "resid_post.1.2", "embed.3", "resid_post.²"):
        assert to_transformerlens(bad) is None
    for bad in ("hook_embed", "blocks.3.hook_resid", "blocks.x.hook_resid_post", "ln_final.hook_normalized"):
        assert from_transformerlens(bad) is None


def test_clamp_sets_component(lm):
    toks = _tokens(lm)
    d = np.random.default_rng(2).standard_normal(lm.config.d_model).astype(np.float32)
    u = d / np.linalg.norm(d)
    _, base = lm.forward(lm.params, toks, capture=("resid_post.0",))
    _, ed = lm.forward(lm.params, toks, capture=("resid_post.0",), edits=[clamp("resid_post.0", d, 7.0, positions=[2, 5])])
    x0, x1 = np.asarray(base["resid_post.0"]), np.asarray(ed["resid_post.0"])
    _close(x1[:, [2, 5]] @ u, np.full((2, 2), 7.0), atol=1e-4)
    # the orthogonal part is untouched; other positions untouched
    _close(x1[:, [2, 5]] - np.outer(x1[:, [2, 5]].reshape(-1, x1.shape[-1]) @ u, u).reshape(2, 2, -1),
           x0[:, [2, 5]] - np.outer(x0[:, [2, 5]].reshape(-1, x0.shape[-1]) @ u, u).reshape(2, 2, -1), atol=1e-4)
    np.testing.assert_array_equal(x1[:, :2], x0[:, :2])


def test_replace_equals_add_and_edits_compose(lm):
    toks = _tokens(lm)
    v = np.random.default_rng(3).standard_normal(lm.config.d_model).astype(np.float32)
    shift = jnp.asarray(v)
    a, _ = lm.forward(lm.params, toks, edits=[add("resid_pre.1", v, alpha=2.0)])
    b, _ = lm.forward(lm.params, toks, edits=[replace("resid_pre.1", lambda x: x + 2.0 * shift)])
    _close(a, b)
    # two adds of alpha 1 at one hook == one add of alpha 2
    c, _ = lm.forward(lm.params, toks, edits=[add("resid_pre.1", v), add("resid_pre.1", v)])
    _close(a, c)


def test_edit_strength_is_traced_not_recompiled(lm):
    toks = _tokens(lm)
    v = np.ones(lm.config.d_model, np.float32)
    lm.forward(lm.params, toks, edits=[add("resid_mid.1", v, alpha=1.0)])
    n = len(lm._compiled)
    outs = [lm.forward(lm.params, toks, edits=[add("resid_mid.1", v * s, alpha=s)])[0] for s in (0.5, 2.0)]
    assert len(lm._compiled) == n
    assert not np.allclose(outs[0], outs[1])


# ---- padding ----------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_singles(lm, side):
    rng = np.random.default_rng(4)
    seqs = [np.concatenate([[1], rng.integers(3, 300, n - 1)]) for n in (9, 5, 7)]
    T = max(len(s) for s in seqs)
    toks = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        toks[b, sl], mask[b, sl] = s, 1
    hooks = ("resid_pre.0", "attn_out.1", "mlp_hidden.1", "resid_post.1")
    v = rng.standard_normal(lm.config.d_model).astype(np.float32)
    edits = [add("resid_mid.0", v, positions=[2])]  # positions count from the first real token
    logits, acts = lm.forward(lm.params, toks, attention_mask_BxT=mask, capture=hooks, edits=edits)
    for b, s in enumerate(seqs):
        ref_logits, ref = lm.forward(lm.params, s[None], capture=hooks, edits=edits)
        real = np.flatnonzero(mask[b])
        _close(np.asarray(logits)[b, real], ref_logits[0], atol=1e-4)
        for h in hooks:
            _close(np.asarray(acts[h])[b, real], ref[h][0], atol=1e-4)
        assert np.isfinite(np.asarray(acts["resid_post.1"])).all()


# ---- generation -------------------------------------------------------------------------

def _check_against_full_forward(lm, prompt, new, logits, edits=()):
    """Token i must be the argmax of a full forward over prompt + new[:i], with the same logits.
    All prefixes run as one right-padded batch (padding is exact, see the padding test)."""
    seqs = [list(prompt) + [int(t) for t in new[:i]] for i in range(len(new))]
    T = len(seqs[-1])
    toks = np.array([s + [0] * (T - len(s)) for s in seqs])
    mask = np.array([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    full, _ = lm.forward(lm.params, toks, attention_mask_BxT=mask, edits=edits)
    last = np.asarray(full)[np.arange(len(seqs)), [len(s) - 1 for s in seqs]]
    _close(logits, last, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(new), last.argmax(-1))


# Generation tests share a few compiled variants (same max_new, flags and prompt bucket).
N_NEW = 6


def _gen(lm, prompts, **kw):
    kw.setdefault("return_logits", True)
    kw.setdefault("stop_at_eos", False)
    return lm.generate(lm.params, prompts, N_NEW, **kw)


def test_greedy_kv_cache_equals_full_recomputation(lm):
    prompt = [1] + lm.tokenizer.encode("The cat")
    new, logits = _gen(lm, prompt)
    assert new.shape == (N_NEW,) and logits.shape == (N_NEW, lm.config.vocab_size)
    _check_against_full_forward(lm, prompt, new, logits)


def test_generation_applies_edits_at_every_position(lm):
    prompt = [1] + lm.tokenizer.encode("Hi")
    v = np.random.default_rng(6).standard_normal(lm.config.d_model).astype(np.float32)
    edits = [add("resid_pre.1", v, alpha=3.0), clamp("resid_mid.0", v, -1.0, positions=[1, 5])]
    new, logits = _gen(lm, prompt, edits=edits)
    _check_against_full_forward(lm, prompt, new, logits, edits=edits)
    plain, _ = _gen(lm, prompt)
    assert not np.array_equal(plain, new)


def test_batched_generation_of_different_lengths_equals_singles(lm):
    prompts = [[1] + lm.tokenizer.encode(s) for s in ("Once up", "Hi", "abc")]
    batch, blogits = _gen(lm, prompts)
    assert batch.shape == (3, N_NEW)
    for b, p in enumerate(prompts):
        single, slogits = _gen(lm, p)
        np.testing.assert_array_equal(batch[b], single)
        _close(blogits[b], slogits, atol=1e-4)


def test_sampling_seeded_and_top_k_one_is_greedy(lm):
    prompt = [1] + lm.tokenizer.encode("Sample")
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95)
    a, _ = _gen(lm, prompt, sampling=s, key=jax.random.key(7))
    b, _ = _gen(lm, prompt, sampling=s, key=jax.random.key(7))
    np.testing.assert_array_equal(a, b)
    others = [_gen(lm, prompt, sampling=s, key=jax.random.key(k))[0] for k in (8, 9)]
    assert any(not np.array_equal(a, c) for c in others)
    greedy, _ = _gen(lm, prompt)
    top1, _ = _gen(lm, prompt, sampling=Sampling(temperature=2.0, top_k=1), key=jax.random.key(3))
    np.testing.assert_array_equal(greedy, top1)
    # a vanishing nucleus keeps only the argmax (top_p is traced: same compiled function as `s`)
    tiny_p, _ = _gen(lm, prompt, sampling=Sampling(temperature=1.0, top_k=50, top_p=1e-6), key=jax.random.key(3))
    np.testing.assert_array_equal(greedy, tiny_p)


def test_top_p_keeps_smallest_nucleus():
    from featureatlas.activation_store.models.generate import sample_token

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)

    def draws(**kw):
        return set(np.asarray(jax.jit(jax.vmap(lambda k: sample_token(logits, k, 1.0, 0.7, greedy=False, **kw)))(keys)).ravel())

    assert draws(top_k=None, use_top_p=True) == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops
    assert draws(top_k=3, use_top_p=False) == {0, 1, 2}


def test_generation_stops_at_eos(lm):
    eos = lm.config.eos_id
    # Push the last residual stream hard towards EOS's unembedding row: EOS becomes the argmax.
    push = add(f"resid_post.{lm.config.n_layers - 1}", np.asarray(lm.W_U[:, eos]), alpha=1e3)
    out, _ = _gen(lm, [1, 50, 60], edits=[push], stop_at_eos=True)
    assert out[0] == eos and (out[1:] == lm.config.pad_id).all()


# ---- conversion, identity, chat ---------------------------------------------------------

def test_hf_round_trip_gives_identical_logits(lm):
    t = lm.to_hf_tensors()
    lm2 = LanguageModel.from_hf_tensors(lm.config, t, lm.tokenizer, "copy", params_hash(t))
    toks = _tokens(lm)
    np.testing.assert_array_equal(lm.forward(lm.params, toks)[0], lm2.forward(lm2.params, toks)[0])
    assert params_hash(lm2.to_hf_tensors()) == lm.weights_hash == params_hash(t)
    for name, a in lm2.to_hf_tensors().items():
        np.testing.assert_array_equal(a, t[name])
    bad = dict(t)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        LanguageModel.from_hf_tensors(lm.config, bad, lm.tokenizer, "bad", "")


def test_random_model_identity():
    a, b = random_model("llama", seed=0), random_model("llama", seed=0)
    c = random_model("llama", seed=1)
    assert a.model_id == "random-llama-2x64-s0" and a.weights_hash == b.weights_hash != c.weights_hash
    assert random_model("gpt2").config.n_kv_heads == 4


def test_chat_template_smollm2_format(lm):
    msgs = [{"role": "user", "content": "Hi there"}]
    assert lm.chat_template(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}]
    assert lm.chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")


def test_forward_inside_user_jit_and_grad(lm):
    toks = jnp.asarray(_tokens(lm))
    v = jnp.ones(lm.config.d_model) / 8

    def loss(alpha):
        logits, _ = lm.forward(lm.params, toks, edits=[add("resid_pre.1", v, alpha=alpha)])
        return jax.nn.logsumexp(logits[:, -1], axis=-1).sum()

    eager = lm.forward(lm.params, np.asarray(toks), edits=[add("resid_pre.1", v, alpha=0.5)])[0]
    _close(jax.jit(lambda a: lm.forward(lm.params, toks, edits=[add("resid_pre.1", v, alpha=a)])[0])(0.5), eager)
    g = jax.grad(loss)(0.5)
    eps = 1e-2
    _close(g, (loss(0.5 + eps) - loss(0.5 - eps)) / (2 * eps), atol=2e-2 * max(1.0, abs(float(g))))
