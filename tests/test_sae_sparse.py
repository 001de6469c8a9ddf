"""Sparse TopK-family products equal their dense counterparts, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.saes import architectures as A
from featureatlas.saes import sparse
from featureatlas.saes.architectures import ARCHITECTURES
from featureatlas.saes.config import SAEConfig


def _problem(B=48, F=200, D=24, K=6, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (B, D))
    enc = jax.random.normal(ks[1], (F, D))
    dec = jax.random.normal(ks[2], (F, D))
    target = jax.random.normal(ks[3], (B, D))
    _, idx = jax.lax.top_k(x @ enc.T, K)
    rows = jnp.repeat(jnp.arange(B), K)
    return x, enc, dec, target, rows, idx.reshape(-1)


def _entries(layout, impl, rows, idx, B):
    if layout == "rows":
        return sparse.row_entries(idx.reshape(B, -1), impl)
    return sparse.coo_entries(rows, idx.reshape(-1), B, None, impl)


@pytest.mark.parametrize("impl", sparse.IMPLS)
@pytest.mark.parametrize("layout", ["rows", "coo"])
def test_sparse_encode_decode_forward_and_grads_equal_dense(impl, layout):
    x, enc, dec, target, rows, feats = _problem()
    B, F = x.shape[0], enc.shape[0]
    b = jax.random.normal(jax.random.key(7), (F,)) * 0.1
    mask_BxF = sparse.dense_codes(rows, feats, jnp.ones(rows.shape), B, F) > 0

    def sparse_loss(x, enc, b, dec):
        e = _entries(layout, impl, rows, feats, B)
        vals = jax.nn.relu(sparse.selected_preacts(e, x, enc, b))
        return jnp.sum((sparse.decode(e, vals, dec) - target) ** 2)

    def dense_loss(x, enc, b, dec):
        codes = jnp.where(mask_BxF, jax.nn.relu(x @ enc.T + b), 0.0)
        return jnp.sum((codes @ dec - target) ** 2)

    args = (x, enc, b, dec)
    np.testing.assert_allclose(jax.jit(sparse_loss)(*args), jax.jit(dense_loss)(*args), rtol=1e-5)
    g_sparse = jax.jit(jax.grad(sparse_loss, (0, 1, 2, 3)))(*args)
    g_dense = jax.jit(jax.grad(dense_loss, (0, 1, 2, 3)))(*args)
    for gs, gd in zip(g_sparse, g_dense):
        np.testing.assert_allclose(gs, gd, rtol=1e-4, atol=1e-4 * float(jnp.abs(gd).max()))


@pytest.mark.parametrize("impl", ["gather", "loop"])
def test_bfloat16_operands_accumulate_in_float32(impl):
    """bfloat16 operands, float32 sums: the decode equals the float32 decode of the rounded operands to
    float32 precision (bfloat16 accumulators would be off by ~1e-3), and the gradients are float32."""
    x, enc, dec, target, rows, feats = _problem(B=64, F=300, D=40, K=16)
    e = sparse.row_entries(feats.reshape(64, 16), impl)
    vals = jax.random.uniform(jax.random.key(4), rows.shape)
    out = jax.jit(lambda v, d: sparse.decode(e, v, d, jnp.bfloat16))(vals, dec)
    assert out.dtype == jnp.float32
    # The codes stay float32 (they are few); the decoder rows are read in bfloat16.
    ref = sparse.dense_codes(rows, feats, vals, 64, 300) @ dec.astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    g_dec = jax.jit(jax.grad(lambda d: jnp.sum(sparse.decode(e, vals, d, jnp.bfloat16) ** 2)))(dec)
    assert g_dec.dtype == jnp.float32


def test_sparse_grads_match_finite_differences():
    x, enc, dec, target, rows, feats = _problem(B=8, F=30, D=5, K=3, seed=1)
    vals = jax.random.uniform(jax.random.key(9), rows.shape)
    e = sparse.row_entries(feats.reshape(8, 3))

    @jax.jit
    def f(vals, dec):
        return jnp.sum(jnp.sin(sparse.decode(e, vals, dec)))

    g_vals, g_dec = jax.jit(jax.grad(f, (0, 1)))(vals, dec)
    u_vals, u_dec = jax.random.normal(jax.random.key(10), vals.shape), jax.random.normal(jax.random.key(11), dec.shape)
    eps = 1e-2
    numeric = (f(vals + eps * u_vals, dec + eps * u_dec) - f(vals - eps * u_vals, dec - eps * u_dec)) / (2 * eps)
    analytic = jnp.sum(g_vals * u_vals) + jnp.sum(g_dec * u_dec)
    np.testing.assert_allclose(numeric, analytic, rtol=2e-3)


def test_scatter_handles_repeated_rows_and_non_multiple_chunks(monkeypatch):
    monkeypatch.setattr(sparse, "CHUNK", 7)  # force several chunks plus padding
    rows = jnp.array([0, 0, 2, 1, 2, 2, 0, 1, 1, 0, 2], jnp.int32)
    feats = jnp.array([3, 3, 1, 0, 4, 1, 2, 2, 0, 4, 3], jnp.int32)
    vals = jnp.arange(1.0, 12.0)
    W = jnp.arange(20.0).reshape(5, 4)
    dense = sparse.dense_codes(rows, feats, vals, 3, 5)
    np.testing.assert_allclose(sparse.scatter_rows(rows, feats, vals, W, 3), dense @ W)
    A_ = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_allclose(sparse.scatter_feats(rows, feats, vals, A_, 5), dense.T @ A_)
    np.testing.assert_allclose(sparse.gather_dot(rows, feats, A_, W), jnp.sum(A_[rows] * W[feats], axis=1))


def test_batchtopk_selects_the_batch_top_k_times_b():
    pre = jax.random.normal(jax.random.key(3), (64, 96)) * 2.0
    k = 5

    @jax.jit
    def select(pre):
        e, _, thr, sat = A.batchtopk_entries(pre, k)
        return e.rows, e.feats, e.valid, thr, sat

    rows, feats, valid, thr, sat = select(pre)
    assert np.all(np.diff(np.asarray(rows)) >= 0)  # rows ascending, padding included
    relu = np.asarray(jax.nn.relu(pre))
    kth = np.sort(relu.ravel())[::-1][k * 64 - 1]
    chosen = np.zeros_like(relu, bool)
    chosen[np.asarray(rows)[np.asarray(valid)], np.asarray(feats)[np.asarray(valid)]] = True
    np.testing.assert_array_equal(chosen, relu >= kth)
    assert chosen.sum() == k * 64 and float(thr) < kth and float(sat) == 0.0


def test_jumprelu_straight_through_gradients():
    """∂/∂θ of z·H(z−θ) is −(θ/ε)·K((z−θ)/ε); of H(z−θ) it is −(1/ε)·K((z−θ)/ε); K = 1[|u|<1/2]."""
    z = jnp.array([0.0, 0.48, 0.52, 0.6, 1.0])
    theta = jnp.full((5,), 0.5)
    eps = 0.1
    g_jump = jax.grad(lambda t: jnp.sum(A.jumprelu(z, t, eps)))(theta)
    g_step = jax.grad(lambda t: jnp.sum(A.heaviside(z, t, eps)))(theta)
    inside = np.abs((np.asarray(z) - 0.5) / eps) < 0.5
    np.testing.assert_allclose(g_jump, np.where(inside, -0.5 / eps, 0.0), rtol=1e-6)
    np.testing.assert_allclose(g_step, np.where(inside, -1.0 / eps, 0.0), rtol=1e-6)
    g_z = jax.grad(lambda z: jnp.sum(A.jumprelu(z, theta, eps)))(z)
    np.testing.assert_allclose(g_z, (np.asarray(z) > 0.5).astype(np.float32))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_saved_fold_reproduces_training_forward(arch):
    """Raw-space saved SAE: codes = training codes / s_out and reconstruction = training recon / s_out."""
    from featureatlas.saes.trainer import saved_sae

    D, F, B = 12, 40, 32
    cfg = SAEConfig(architecture=arch, d_in=D, width=F, k=4, hook_in="h", matryoshka_base="topk"
                    if arch == "matryoshka" else "batchtopk", input_scale=3.0, output_scale=3.0).validate()
    key = jax.random.key(0)
    x = jax.random.normal(key, (B, D)) + 0.3
    params, buffers = A.init_params(cfg, jax.random.key(1), np.full(D, 0.2), np.zeros(D))
    ks = jax.random.split(jax.random.key(2), 8)
    params = {n: p + 0.1 * jax.random.normal(ks[i], p.shape) for i, (n, p) in enumerate(params.items())}
    params = A.normalise_decoder(params)
    if arch == "jumprelu":
        params["log_threshold"] = jnp.full((F,), np.log(0.3))
    @jax.jit
    def train_forward(params, buffers, x):
        _, stats = A.forward_loss(cfg, params, buffers, x * cfg.input_scale, x * cfg.output_scale, 0.0)
        return A.update_buffers(cfg, buffers, stats, B)

    buffers = train_forward(params, buffers, x)
    if cfg.selection == "batchtopk":  # the batch threshold equals a data value; move it off any tie
        assert float(buffers["threshold"]) > 0
        buffers["threshold"] = jnp.float32(0.4321)
    sae = saved_sae(cfg, params, buffers)
    # Training-space reconstruction through the dense pre-activations (the inference rule of each arch).
    recon_train = jax.jit(lambda *a: _dense_training_recon(cfg, *a))(params, buffers, x * cfg.input_scale)
    np.testing.assert_allclose(sae.reconstruct(x), recon_train / cfg.output_scale, rtol=1e-4, atol=1e-5)
    assert np.allclose(np.linalg.norm(np.asarray(sae.directions_FxD), axis=1), 1.0, atol=1e-5)


def _dense_training_recon(cfg, params, buffers, x):
    c = params["b_dec"]
    if cfg.architecture == "gated":
        proj = (x - c) @ params["enc_FxD"].T
        codes = jnp.where(proj + params["b_gate"] > 0,
                          jax.nn.relu(proj * jnp.exp(params["r_mag"]) + params["b_mag"]), 0.0)
    else:
        pre = (x - c) @ params["enc_FxD"].T + params["b_enc"]
        sel = cfg.selection
        if sel == "relu":
            codes = jax.nn.relu(pre)
        elif sel == "jumprelu":
            codes = jnp.where(pre > jnp.exp(params["log_threshold"]), pre, 0.0)
        elif sel == "batchtopk":
            codes = jnp.where(pre > buffers["threshold"], pre, 0.0)
        else:
            v, i = jax.lax.top_k(jax.nn.relu(pre), cfg.k)
            codes = jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], i].set(v)
    return codes @ params["dec_FxE"] + params["b_dec"]


@pytest.mark.parametrize("arch,base", [("topk", "batchtopk"), ("batchtopk", "batchtopk"), ("matryoshka", "batchtopk"),
                                       ("matryoshka", "topk")])
@pytest.mark.parametrize("impl", ["loop", "gather"])
def test_new_paths_equal_the_legacy_path(arch, base, impl):
    """Loss, statistics and every gradient of a random SAE (AuxK active) equal the pre-issue-11 path's,
    float32, to a relative error of 1e-5."""
    D, F, B, k = 24, 384, 64, 8
    cfg = SAEConfig(architecture=arch, d_in=D, width=F, k=k, hook_in="h", matryoshka_base=base, dead_tokens=100,
                    k_aux=32, matryoshka_prefixes=(48, 96, 384) if arch == "matryoshka" else ()).validate()
    params, buffers = A.init_params(cfg, jax.random.key(1), np.full(D, 0.1), np.zeros(D))
    ks = jax.random.split(jax.random.key(2), 8)
    params = {n: p + 0.05 * jax.random.normal(ks[i], p.shape) for i, (n, p) in enumerate(params.items())}
    buffers["since_fired"] = jnp.where(jax.random.uniform(ks[6], (F,)) < 0.2, 1000.0, 0.0)  # some dead latents
    x = jax.random.normal(ks[7], (B, D)) + 0.3

    def run(name):
        with sparse.use_impl(name):
            def f(p):
                loss, stats = A.forward_loss(cfg, p, buffers, x, x, 0.0, jax.random.key(3))
                return loss, {k: v for k, v in stats.items()}
            (loss, stats), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return jax.device_get((loss, stats, grads))

    loss_old, stats_old, g_old = run("legacy")
    loss_new, stats_new, g_new = run(impl)
    assert float(stats_old["auxk"]) > 0  # the AuxK branch ran
    np.testing.assert_allclose(loss_new, loss_old, rtol=1e-5)
    np.testing.assert_array_equal(stats_new["fired_F"], stats_old["fired_F"])
    for name in g_old:
        a, b = np.asarray(g_new[name], np.float64), np.asarray(g_old[name], np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-12, (name, np.linalg.norm(a - b) / np.linalg.norm(b))


def test_bfloat16_dense_matmuls_run_in_bfloat16_both_ways():
    """The dense path's backward matmuls read bfloat16 too (autodiff alone ran them in float32) and sum in
    float32; gradients stay float32 and close to the float32 ones."""
    ks = jax.random.split(jax.random.key(0), 3)
    a, b, c = jax.random.normal(ks[0], (16, 32)), jax.random.normal(ks[1], (64, 32)), jax.random.normal(ks[2], (64, 8))

    def f(a, b, c, dtype):
        return jnp.sum(A._mm_n(jax.nn.relu(A._mm(a, b, dtype)), c, dtype) ** 2)

    grad = jax.jit(jax.grad(f, (0, 1, 2)), static_argnums=3)
    for g16, g32 in zip(grad(a, b, c, jnp.bfloat16), grad(a, b, c, jnp.float32)):
        assert g16.dtype == jnp.float32
        assert float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32)) < 2e-2
    hlo = grad.lower(a, b, c, jnp.bfloat16).as_text(dialect="hlo")
    shapes = {line.split("=")[0].strip(): line.split("=")[1].split()[0] for line in hlo.splitlines() if " = " in line}
    dots = [line.split("dot(")[1].split(")")[0].split(", ") for line in hlo.splitlines() if " dot(" in line]
    assert len(dots) == 6 and all(shapes[x].startswith("bf16") for d in dots for x in d)
