"""Exact chunked top-k (saes/topk.py) and the HLO of the compiled TopK step (scripts/hlo_check.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.saes import topk
from featureatlas.scripts import hlo_check

KS = (16, 32, 64, 256)


def _rows(kind: str, B: int, F: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.normal(size=(B, F))
    if kind == "ties":  # few distinct values, many zeros of both signs, −inf
        x = rng.integers(-3, 4, size=(B, F)).astype(np.float64)
        x[rng.random((B, F)) < 0.15] = 0.0
        x[rng.random((B, F)) < 0.05] = -0.0
        x[rng.random((B, F)) < 0.2] = -np.inf
        x[: B // 4] = 1.0  # whole rows of one value
        return x
    if kind == "clustered":  # all large values packed in one stretch of each row
        x = rng.normal(size=(B, F)) * 0.01
        for b in range(B):
            start = rng.integers(0, F - 300)
            x[b, start:start + 300] += 5.0 + rng.normal(size=300) * 0.01
        return x
    raise ValueError(kind)


def _bits(v) -> np.ndarray:
    v = np.asarray(v)
    return v.view(np.uint16 if v.dtype.itemsize == 2 else np.uint32)


_chunked = jax.jit(topk.chunked_top_k, static_argnums=(1, 2))
_lax = jax.jit(jax.lax.top_k, static_argnums=1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["gaussian", "ties", "clustered"])
def test_chunked_top_k_equals_lax_top_k(dtype, kind):
    """Values (bit for bit) and indices equal lax.top_k's, for widths that are and are not multiples of
    the chunk size, at the default chunk size and at a small odd one."""
    for F in (4608, 4099):
        x = jnp.asarray(_rows(kind, 24, F, seed=F), dtype)
        for k in KS:
            want_v, want_i = _lax(x, k)
            for s in sorted({topk.chunk_size(F, k), 7} - {1}):
                got_v, got_i = _chunked(x, k, s)
                np.testing.assert_array_equal(got_i, want_i, err_msg=f"F={F} k={k} s={s}")
                np.testing.assert_array_equal(_bits(got_v), _bits(want_v), err_msg=f"F={F} k={k} s={s}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_padding_never_wins_over_real_infinities_or_nans(dtype):
    """Rows with fewer finite entries than k: the real −inf (and −NaN) entries are chosen, by index,
    never the padded slots of a width that is not a multiple of the chunk."""
    F, k = 1001, 64
    x = np.full((4, F), -np.inf)
    x[0, [3, 500, 1000]] = [1.0, 2.0, 0.5]
    x[1, 990:] = 1.0  # the finite entries sit in the padded last chunk
    x[2] = np.nan  # positive NaN ranks above +inf
    x[2, ::2] = -np.inf
    x[3, :] = -np.nan  # −NaN ranks below −inf
    x[3, 700:710] = -np.inf
    x = jnp.asarray(x, dtype)
    want_v, want_i = _lax(x, k)
    for s in (7, 13, 15):
        got_v, got_i = _chunked(x, k, s)
        assert int(jnp.max(got_i)) < F
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(_bits(got_v), _bits(want_v))


def test_top_k_methods_and_chunk_size():
    x = jnp.asarray(_rows("gaussian", 8, 65536), jnp.float32)
    for method in ("lax", "chunked"):
        v, i = topk.top_k(x, 64, method)
        np.testing.assert_array_equal(i, jax.lax.top_k(x, 64)[1])
    assert topk.chunk_size(65536, 64) == 32  # √(F/k): two ~2048-wide top-ks instead of one 65536-wide
    assert topk.chunk_size(100, 64) == 1  # too narrow to gain: lax.top_k
    for F, k in [(4608, 32), (4099, 256), (1024, 256), (300, 16)]:
        s = topk.chunk_size(F, k)
        assert s == 1 or -(-F // s) >= k
    with pytest.raises(ValueError, match="method"):
        topk.top_k(x, 4, "sorted")


def test_saved_topk_encode_uses_chunked_top_k(monkeypatch):
    from featureatlas.saes.architectures import _encode_topk

    ks = jax.random.split(jax.random.key(0), 3)
    params = {"W_enc": jax.random.normal(ks[0], (16, 2048)), "b_enc": jax.random.normal(ks[1], (2048,)) * 0.1}
    x = jax.random.normal(ks[2], (32, 16))
    want = _encode_topk(params, x, 32)
    monkeypatch.setattr(topk, "default_method", lambda: "chunked")
    np.testing.assert_array_equal(jax.jit(_encode_topk, static_argnums=2)(params, x, 32), want)


# ---------------------------------------------------------------------------------------------
# The compiled step's HLO
# ---------------------------------------------------------------------------------------------
SIZES = {"d_in": 48, "width": 2048, "batch": 256, "k": 32}  # k > 16: a full sort on GPU with lax.top_k


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accelerator_step_has_no_loop_full_sort_or_bf16_scatter(arch, dtype):
    """The step the GPU/TPU runs ('gather'), lowered and compiled here: no while loop carrying floats,
    no sort or top-k over the whole [B, F] pre-activations, no bfloat16 scatter."""
    r = hlo_check.check_step(arch, dtype, "gather", **SIZES)
    assert not r["while_loop"], (r["lowered"]["while_loops"], r["compiled"]["while_loops"])
    assert not r["full_width_sort"], r["compiled"]["full_width_sorts"]
    assert not r["full_width_topk"], r["lowered"]["full_width_topks"]
    assert not r["bf16_scatter"], r["compiled"]["bf16_scatters"]
    assert r["lowered"]["topks"]  # the chunked top-k's small ones are there


def test_cpu_step_has_no_full_sort_or_bf16_scatter():
    """CPU's own path keeps cache-sized loops and XLA:CPU's partial-sort top-k, and no bfloat16 scatter."""
    r = hlo_check.check_step("topk", "bfloat16", "loop", **SIZES)
    assert not r["full_width_sort"] and not r["bf16_scatter"]


def test_the_check_sees_what_the_legacy_step_had():
    """The legacy bfloat16 step: chunk loops, a full-width top-k and bfloat16 scatter-adds."""
    r = hlo_check.check_step("topk", "bfloat16", "legacy", **SIZES)
    assert r["while_loop"] and r["full_width_topk"] and r["bf16_scatter"]


def test_analyse_reads_fusions_sorts_and_scatters():
    text = """HloModule m
%fused_computation (p: f32[8,4,64]) -> f32[8,64] {
  %p = f32[8,4,64]{2,1,0} parameter(0)
  %big = f32[8,4,64]{2,1,0} add(%p, %p)
  ROOT %r = f32[8,64]{1,0} reduce(%big, %p), dimensions={1}
}
ENTRY %main (a: f32[8,64], i: s32[8,4], w: f32[64,64]) -> f32[8,64] {
  %a = f32[8,64]{1,0} parameter(0)
  %s = f32[8,64]{1,0} sort(%a), dimensions={1}
  %g = f32[8,4,64]{2,1,0} gather(%w, %i)
  %sc = bf16[64,16]{1,0} scatter(%w, %i, %g)
  %w1 = (s32[], f32[8]) while(%t), condition=%c, body=%b
  %w2 = (s32[], u32[4]) while(%t2), condition=%c2, body=%b2
  ROOT %f = f32[8,64]{1,0} fusion(%g), kind=kLoop, calls=%fused_computation
}
"""
    out = hlo_check.analyse(text, B=8, F=64, k=4, D=64)
    assert out["while_loops"] == 1 and out["integer_while_loops"] == 1
    assert len(out["full_width_sorts"]) == 1 and len(out["bf16_scatters"]) == 1
    assert out["materialised_BkD"] == ["g (gather): f32[8,4,64]"]  # the fused add of the same size is not
