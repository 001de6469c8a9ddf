"""Spliced-model CE/KL metrics on a tiny random model, plus one real-SmolLM2 check."""
import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.activation_store.models import random_model, replace
from featureatlas.eval.splice import splice_metrics

D = 32


@pytest.fixture(scope="module")
def lm():
    return random_model("llama", n_layers=1, d_model=D, n_heads=4, n_kv_heads=2, d_mlp=64, vocab_size=300, seed=0)


class Identity:
    """decode(encode(x)) == x exactly: codes = [relu(x), relu(-x)] (test fixture dictionary)."""

    def __init__(self, hook, d):
        self.hook, self.n_features, self.d = hook, 2 * d, d

    def encode(self, x):
        return jnp.concatenate([jnp.maximum(x, 0), jnp.maximum(-x, 0)], axis=-1)

    def decode(self, c):
        return c[:, : self.d] - c[:, self.d:]


class Zero:
    def __init__(self, hook, d):
        self.hook, self.n_features, self.d = hook, 1, d

    def encode(self, x):
        return jnp.zeros((x.shape[0], 1), x.dtype)

    def decode(self, c):
        return jnp.zeros((c.shape[0], self.d), c.dtype)


class Projection:
    """Orthogonal projection onto a rank-r subspace P (D x r), as a nonnegative-code dictionary."""

    def __init__(self, hook, P, hook_out=None):
        self.hook, self.P = hook, jnp.asarray(P, jnp.float32)
        self.n_features = 2 * self.P.shape[1]
        if hook_out:
            self.hook_out = hook_out

    def encode(self, x):
        z = x @ self.P
        return jnp.concatenate([jnp.maximum(z, 0), jnp.maximum(-z, 0)], axis=-1)

    def decode(self, c):
        r = self.P.shape[1]
        return (c[:, :r] - c[:, r:]) @ self.P.T


def _contexts(n=5, T=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 300, size=(n, T)).astype(np.int32)
    tokens[:, 0] = 1  # BOS
    mask = np.ones_like(tokens)
    mask[1, 11:] = 0  # right padding
    mask[3, 6:] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def _random_basis(d, r, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q[:, :r].astype(np.float32)


def _numpy_ce_kl(logits_clean, logits_x, tokens, mask):
    def logsoftmax(a):
        a = np.asarray(a, np.float64)
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    lc, lx = logsoftmax(logits_clean)[:, :-1], logsoftmax(logits_x)[:, :-1]
    valid = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    nxt = tokens[:, 1:]
    ce_c = -np.take_along_axis(lc, nxt[..., None], -1)[..., 0]
    ce_x = -np.take_along_axis(lx, nxt[..., None], -1)[..., 0]
    kl = (np.exp(lc) * (lc - lx)).sum(-1)
    return ce_c[valid].mean(), ce_x[valid].mean(), kl[valid].mean(), int(valid.sum())


def test_identity_dictionary_recovers_everything(lm):
    tokens, mask = _contexts()
    m = splice_metrics(lm, Identity("resid_post.0", D), tokens, mask, batch_size=3)  # 2 batches, last padded
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-6)
    assert m["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_zero"] > 0  # (a random model's CE need not get worse under ablation)
    assert m["n_predictions"] == 5 * 15 - 5 - 10


def test_zero_dictionary_scores_zero(lm):
    tokens, mask = _contexts()
    m = splice_metrics(lm, Zero("resid_post.0", D), tokens, mask, batch_size=5)
    assert m["ce_spliced"] == pytest.approx(m["ce_zero_ablation"], abs=1e-6)
    assert m["ce_score"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_score"] == pytest.approx(0.0, abs=1e-5)


def test_ce_and_kl_match_numpy_and_error_term_restores_clean(lm):
    tokens, mask = _contexts(seed=1)
    dic = Projection("resid_post.0", _random_basis(D, 8))
    m = splice_metrics(lm, dic, tokens, mask, batch_size=5, error_term=True)
    T = tokens.shape[1]
    fn = lambda x: dic.decode(dic.encode(x.reshape(-1, D))).reshape(x.shape)  # noqa: E731
    logits_clean, _ = lm.forward(lm.params, jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask))
    logits_sp, _ = lm.forward(lm.params, jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask),
                              edits=(replace("resid_post.0", fn, positions=np.arange(1, T)),))
    ce_c, ce_x, kl, n = _numpy_ce_kl(logits_clean, logits_sp, tokens, mask)
    assert m["n_predictions"] == n
    assert m["ce_clean"] == pytest.approx(ce_c, rel=1e-5)
    assert m["ce_spliced"] == pytest.approx(ce_x, rel=1e-5)
    assert m["kl_spliced"] == pytest.approx(kl, rel=1e-4)
    assert m["kl_spliced"] > 1e-3  # a rank-8 projection of a 32-d stream changes the output
    assert m["ce_with_error"] == pytest.approx(m["ce_clean"], abs=1e-5)
    assert m["kl_with_error"] == pytest.approx(0.0, abs=1e-5)


def test_splicing_bos_changes_only_when_asked(lm):
    tokens, mask = _contexts(seed=2)
    dic = Zero("resid_post.0", D)
    kept = splice_metrics(lm, dic, tokens, mask, batch_size=5, error_term=False)
    spliced = splice_metrics(lm, dic, tokens, mask, batch_size=5, skip_bos=False, error_term=False)
    assert kept["ce_spliced"] != pytest.approx(spliced["ce_spliced"], abs=1e-4)


def test_transcoder_splice_equals_two_pass_reference(lm):
    tokens, mask = _contexts(seed=3)
    T = tokens.shape[1]
    dic = Projection("resid_mid.0", _random_basis(D, 6, seed=4), hook_out="mlp_out.0")
    m = splice_metrics(lm, dic, tokens, mask, batch_size=5, error_term=True)
    # Reference: capture hook_in, reconstruct, then replace hook_out with that block.
    logits_clean, acts = lm.forward(lm.params, jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask),
                                    capture=("resid_mid.0",))
    x = acts["resid_mid.0"]
    recon = dic.decode(dic.encode(x.reshape(-1, D))).reshape(x.shape)
    logits_tc, _ = lm.forward(lm.params, jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask),
                              edits=(replace("mlp_out.0", lambda y: recon, positions=np.arange(1, T)),))
    ce_c, ce_x, kl, _ = _numpy_ce_kl(logits_clean, logits_tc, tokens, mask)
    assert m["ce_spliced"] == pytest.approx(ce_x, rel=1e-5)
    assert m["kl_spliced"] == pytest.approx(kl, rel=1e-4)
    assert m["ce_with_error"] == pytest.approx(m["ce_clean"], abs=1e-5)
    with pytest.raises(ValueError, match="does not come before"):
        splice_metrics(lm, Projection("mlp_out.0", _random_basis(D, 2), hook_out="resid_mid.0"), tokens, mask)


@pytest.mark.slow
def test_smollm2_pca_dictionary_is_between_zero_and_identity(smollm2):
    lm = smollm2
    texts = [
        "The central bank raised interest rates again on Thursday, citing persistent inflation in services.",
        "Manchester United came from behind to win the match, with two goals in the final ten minutes.",
        "The new phone has a larger screen, a faster processor and a battery that lasts two full days.",
        "Voters will head to the polls next month after a campaign dominated by questions about the economy.",
    ]
    T = 24
    tokens, mask = np.zeros((len(texts), T), np.int32), np.zeros((len(texts), T), np.int32)
    for i, t in enumerate(texts):
        ids = ([lm.tokenizer.bos_id] + lm.tokenizer.encode(t))[:T]
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
    hook = "resid_post.15"
    _, acts = lm.forward(lm.params, jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask),
                         capture=(hook,), stop_at="capture")
    real = mask.astype(bool).copy()
    real[:, 0] = False  # BOS
    x = np.asarray(acts[hook])[real].astype(np.float64)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    pca = Projection(hook, vt[:16].T)  # rank 16 of 576 (through the origin, so the mean is lost too)
    m = splice_metrics(lm, pca, tokens, mask, batch_size=4, error_term=False)
    assert 0.0 < m["ce_score"] < 1.0, m
    assert m["ce_clean"] < m["ce_spliced"] < m["ce_zero_ablation"]
    ident = splice_metrics(lm, Identity(hook, lm.hook_dim(hook)), tokens, mask, batch_size=4, error_term=False)
    assert ident["ce_score"] == pytest.approx(1.0, abs=1e-4)
    assert ident["kl_spliced"] == pytest.approx(0.0, abs=1e-4)


def test_evaluate_dictionary_on_a_store_from_the_model(lm, tmp_path):
    from featureatlas.activation_store import write_store
    from featureatlas.eval import evaluate_dictionary, splice_metrics
    from featureatlas.eval.splice import contexts_from_store

    rng = np.random.default_rng(5)
    N, T = 40, 16
    tokens = rng.integers(3, 300, size=(N, T)).astype(np.int32)
    tokens[:, 0] = 1
    n_valid = rng.integers(4, T + 1, size=N).astype(np.int32)
    mask = (np.arange(T)[None] < n_valid[:, None]).astype(np.int32)
    tokens[mask == 0] = 0
    hooks = ("resid_mid.0", "mlp_out.0")
    _, acts = lm.forward(lm.params, jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask), capture=hooks)
    store = write_store(tmp_path / "s.h5", {h: np.asarray(acts[h]).reshape(N * T, D) for h in hooks}, tokens,
                        n_valid=n_valid, attrs={"model_id": lm.model_id, "weights_hash": lm.weights_hash},
                        val_fraction=0.25, bos_id=1)
    dic = Projection("resid_mid.0", _random_basis(D, 5, seed=6), hook_out="mlp_out.0")  # a transcoder

    m = evaluate_dictionary(dic, store, lm=lm, n_tokens=60, n_contexts_ce=5, batch_size=16, ce_batch_size=5)
    # Reconstruction: the first 60 val rows (no BOS, no padding) in store order.
    rows = store.token_rows("val")[:60]
    x_in, y = store.read_rows("resid_mid.0", rows), store.read_rows("mlp_out.0", rows)
    y_hat = np.asarray(dic.decode(dic.encode(jnp.asarray(x_in))))
    assert m["n_tokens"] == 60
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert m["fvu"] == pytest.approx(fvu, rel=1e-4)
    # Splice: the same numbers as splice_metrics on the chosen val contexts.
    toks, msk = contexts_from_store(store, 5, split="val")
    val_ids = np.flatnonzero(store.context_split("val"))
    assert toks.shape == (5, T)
    for row, m_row in zip(toks, msk):  # each is a val context, masked after its n_valid tokens
        (match,) = [c for c in val_ids if np.array_equal(store.tokens[c], row)]
        assert m_row.sum() == store.n_valid[match] and m_row[: store.n_valid[match]].all()
    ref = splice_metrics(lm, dic, toks, msk, batch_size=5)
    assert m["ce_score"] == pytest.approx(ref["ce_score"], rel=1e-6)
    assert m["ce_with_error"] == pytest.approx(m["ce_clean"], abs=1e-5)
