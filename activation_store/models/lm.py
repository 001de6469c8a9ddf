"""LanguageModel: a frozen decoder-only transformer in pure JAX, with hooks, edits and generation.

Quick reference
---------------
    from featureatlas.activation_store.models import load_model, random_model, add, clamp, replace, Sampling
    lm = random_model("llama", n_layers=2, d_model=64)        # or load_model("smollm2-135m")

    logits_BxTxV, acts = lm.forward(lm.params, tokens_BxT, attention_mask_BxT=mask_BxT,
                                    capture=("resid_post.1", "mlp_hidden.0"))
    _, acts = lm.forward(lm.params, tokens_BxT, capture=("mlp_hidden.15",), stop_at="capture")
    logits, _ = lm.forward(lm.params, tokens_BxT, edits=[add("resid_pre.1", v_D, alpha=4.0)])
    new_BxN = lm.generate(lm.params, [[1, 72, 105], [1, 72]], max_new=20,
                          sampling=Sampling(temperature=0.7, top_p=0.9), key=jax.random.key(0))

Hooks (per layer L, 0-based): resid_pre.L, attn_out.L, resid_mid.L (= resid_pre + attn_out),
mlp_hidden.L (after the nonlinearity / gate product: the input of the down projection),
mlp_out.L (= mlp_hidden.L @ write_matrix("mlp_hidden.L"), + b_down for GPT-2), resid_post.L (= resid_mid + mlp_out
= resid_pre.(L+1)). Width: d_mlp for mlp_hidden, d_model otherwise (`hook_dim`).

forward(params, tokens_BxT, *, attention_mask_BxT=None, capture=(), edits=(), stop_at=None,
        compute_dtype="float32") -> (logits_BxTxV | None, {hook: acts_BxTxd})
  * attention_mask_BxT: 1 = real token, 0 = padding, left or right. Positions are counted from
    the first real token, so a padded row equals the same sequence run alone. Values captured at
    padded positions are finite but meaningless.
  * stop_at="capture": run only up to the deepest captured hook; skip final norm and
    unembedding; logits is None (what harvesting uses).
  * edits: `add`, `clamp`, `replace` from `activation_store.models.edits`; applied in order at
    their hook; a captured hook returns its edited value. Positions count from the first real token.
  * Compiled once per static structure (capture set, depth, logits or not, edit kinds/hooks/
    replace-fns/number of positions); input shapes as usual for jax.jit. Edit vectors and
    strengths are traced, so sweeping them does not recompile. forward may also be called inside
    your own jax.jit / grad / vmap (tokens as tracers; then only shapes are validated).
  * compute_dtype: "float32" (default) or "bfloat16", which runs the pass the way transformers runs a
    bfloat16 model (bfloat16 weights, activations and matmul outputs; norm statistics and the attention
    softmax in float32; see transformer.py). Logits and captured hooks always come back float32. Pass
    `lm.params_in("bfloat16")` (cast once, cached) to skip the cast of float32 params inside each call.
    On accelerators bfloat16 is the fast path for harvesting; on CPU it is slower than float32.
  * Speed (fp32, 2-core CPU): harvest batches of 16-32 x 128 tokens keep the matmuls ~85-90% as
    fast as a bare matmul chain; see scripts/bench_lm.py.

generate(params, prompt_tokens, max_new, *, sampling=Sampling(), edits=(), key=None,
         stop_at_eos=True, return_logits=False, pad_to=8)
  * prompt_tokens: one token list (-> [max_new]) or a list of lists of different lengths
    (-> [B, max_new]); batches are left-padded internally. Include BOS yourself.
  * KV cache; edits apply at every position, prompt and generated. After EOS a row is filled
    with config.pad_id (EOS when there is none).
  * key: a jax PRNG key for sampling (default key(0)); same key, same tokens.
  * return_logits=True also returns logits_[B]xNxV, the distribution each new token came from.
  * pad_to: the batch is left-padded to a multiple of pad_to tokens; one function is compiled per
    padded length, so a larger pad_to (e.g. 64) means fewer compiles for prompts of varied lengths.

unembed(x_D or x_NxD) = final_norm(x) @ W_U;  W_U: [D, V];  write_matrix(hook): W_down [d_mlp, D]
for mlp_hidden.L, None for hooks already in the residual stream.
chat_template(messages) formats [{"role", "content"}, ...] in SmolLM2's ChatML.
from_hf_tensors / to_hf_tensors convert to and from Hugging Face tensor names (the loaders' boundary).
"""
from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

from . import transformer
from featureatlas.activation_store.errors import ConfigError

from .config import ModelConfig
from .edits import Edit
from .gguf_loader import CorruptModelError
from .generate import GenPlan, Sampling, generate_core

# SmolLM2-Instruct's chat template adds this system turn when the conversation has none.
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_MAX_COMPILED = 64  # compiled variants kept per model (LRU): bounds memory if callers make fresh replace-fns


def params_hash(tensors: dict) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, names sorted: a stable weights id."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class LanguageModel:
    """A frozen transformer: `config`, `params` (pytree of jnp arrays), `tokenizer`, `model_id`,
    `weights_hash`, and pure jitted functions over params (see the module docstring). Built by
    `from_hf_tensors`, which checks the config (every loader and `random_model` go through it)."""

    def __init__(self, config: ModelConfig, params, tokenizer, model_id: str, weights_hash: str):
        self.config = config
        self.params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.weights_hash = weights_hash
        self.chat_system_prompt: str | None = SMOLLM2_SYSTEM_PROMPT  # chat_template's default system turn
        self.hook_names: tuple[str, ...] = config.hook_names()
        self._compiled: OrderedDict = OrderedDict()
        self._W_U = None
        self._params_in: tuple | None = None  # (source params, dtype, cast copy)

    def __repr__(self) -> str:
        c = self.config
        return (f"LanguageModel({self.model_id!r}, arch={c.arch}, layers={c.n_layers}, d_model={c.d_model}, "
                f"d_mlp={c.d_mlp}, vocab={c.vocab_size})")

    # ---- Hugging Face tensor boundary ---------------------------------------------------

    @classmethod
    def from_hf_tensors(cls, config: ModelConfig, tensors: dict, tokenizer, model_id: str,
                        weights_hash: str) -> "LanguageModel":
        """Build from HF-named tensors (Llama: PyTorch [out, in] Linear weights, HF rotate_half RoPE
        layout; GPT-2: Conv1D [in, out], an optional 'transformer.' prefix is accepted)."""
        _check_config(config)
        arch = transformer.ARCHS[config.arch]
        if config.arch == "gpt2":
            tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        spec = arch.hf_spec(config)
        missing = [n for n in spec if n not in tensors]
        if missing:
            more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
            raise CorruptModelError(f"{model_id}: missing {config.arch} tensors {missing[:8]}{more}; "
                             "check the checkpoint matches the config (tied_embeddings, qkv_bias, n_layers)")
        for name, (shape, _) in spec.items():
            got = tuple(np.shape(tensors[name]))
            if got != tuple(shape):
                raise CorruptModelError(f"{model_id}: tensor {name} has shape {got}, config implies {tuple(shape)}")
        return cls(config, arch.from_hf(config, tensors), tokenizer, model_id, weights_hash)

    def to_hf_tensors(self) -> dict:
        """HF-named numpy fp32 tensors; from_hf_tensors(config, lm.to_hf_tensors(), ...) rebuilds this model."""
        return transformer.ARCHS[self.config.arch].to_hf(self.config, self.params)

    # ---- hooks --------------------------------------------------------------------------

    def check_hook(self, hook: str) -> tuple[str, int]:
        """(kind, layer) of a valid hook name, else ConfigError (a ValueError) listing the valid ones."""
        return self.config.check_hook(hook, self.model_id)

    def hook_dim(self, hook: str) -> int:
        kind, _ = self.check_hook(hook)
        return self.config.d_mlp if kind == "mlp_hidden" else self.config.d_model

    def write_matrix(self, hook: str):
        """Maps the hook's space into the residual stream: W_down [d_mlp, D] for mlp_hidden.L;
        None for hooks that already live in the residual stream."""
        kind, layer = self.check_hook(hook)
        return self.params["layers"][layer]["w_down"] if kind == "mlp_hidden" else None

    @property
    def W_U(self):
        """Unembedding [D, V] (the transposed embedding when tied; computed once per weights)."""
        src = self.params.get("unembed", self.params["embed"])
        if self._W_U is None or self._W_U[0] is not src:
            self._W_U = (src, transformer.unembed_matrix_DxV(self.params))
        return self._W_U[1]

    def params_in(self, compute_dtype: str):
        """`params` cast to a compute dtype (float32: params itself); the cast copy of the current params
        is kept, so a harvest casts once instead of inside every forward call."""
        compute_dtype = check_compute_dtype(compute_dtype)
        if jnp.dtype(compute_dtype) == jnp.float32 and all(
                a.dtype == jnp.float32 for a in jax.tree.leaves(self.params)):
            return self.params
        cached = self._params_in
        if cached is None or cached[0] is not self.params or cached[1] != compute_dtype:
            cached = self._params_in = (self.params, compute_dtype, transformer.cast_params(self.params, compute_dtype))
        return cached[2]

    def unembed(self, x_D):
        """final_norm(x) @ W_U for a residual-stream vector [D] or batch [..., D] -> logits [..., V]."""
        x = jnp.asarray(x_D, jnp.float32)
        if x.shape[-1] != self.config.d_model:
            raise ValueError(f"unembed expects vectors of width d_model={self.config.d_model}, got {x.shape}")
        fn = self._compiled_fn(("unembed",), lambda: jax.jit(functools.partial(
            transformer.logits_from_resid, self.config)))
        return fn(self.params, x)

    # ---- forward ------------------------------------------------------------------------

    def forward(self, params, tokens_BxT, *, attention_mask_BxT=None, capture=(), edits=(), stop_at=None,
                compute_dtype: str = "float32"):
        """(logits_BxTxV | None, {hook: acts_BxTxd}), float32; see the module docstring."""
        compute_dtype = check_compute_dtype(compute_dtype)
        tokens_BxT, mask_BxT = self._check_tokens(tokens_BxT, attention_mask_BxT)
        capture = (capture,) if isinstance(capture, str) else tuple(capture)
        for h in capture:
            self.check_hook(h)
        capture = tuple(dict.fromkeys(capture))  # duplicates dropped, first occurrence order
        edits = self._check_edits(edits)
        if stop_at not in (None, "capture"):
            raise ValueError(f"stop_at must be None or 'capture', got {stop_at!r}")
        if stop_at == "capture":
            if not capture:
                raise ValueError("stop_at='capture' needs at least one hook in capture")
            n_layers, want_logits = 1 + max(self.check_hook(h)[1] for h in capture), False
            # edits deeper than the last run layer cannot change what is captured
            edits = tuple(e for e in edits if self.check_hook(e.hook)[1] < n_layers)
        else:
            n_layers, want_logits = self.config.n_layers, True
        sites = transformer.Sites(capture, tuple(e.static_key() for e in edits))
        fn = self._compiled_fn(("forward", sites, n_layers, want_logits, compute_dtype), lambda: jax.jit(
            functools.partial(transformer.forward, self.config, sites, n_layers, want_logits,
                              compute_dtype=compute_dtype), **transformer.JIT_OPTIONS[compute_dtype]))
        return fn(params, tokens_BxT, mask_BxT, [e.dynamic_args() for e in edits])

    # ---- generation ---------------------------------------------------------------------

    def generate(self, params, prompt_tokens, max_new: int, *, sampling: Sampling = Sampling(), edits=(),
                 key=None, stop_at_eos: bool = True, return_logits: bool = False, pad_to: int = 8):
        """Tokens generated after each prompt (KV cache; edits at every position); see module docstring."""
        # one prompt ([ints] or a 1-D array), or a batch (list of lists / 2-D array)
        single = (len(prompt_tokens.shape) == 1 if hasattr(prompt_tokens, "shape")
                  else all(np.ndim(t) == 0 for t in prompt_tokens))
        rows = [list(map(int, prompt_tokens))] if single else [list(map(int, r)) for r in prompt_tokens]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("generate needs non-empty prompts (start them with BOS)")
        if max_new < 1:
            raise ValueError(f"max_new must be >= 1, got {max_new}")
        longest = max(len(r) for r in rows)
        if self.config.arch == "gpt2" and longest + max_new > self.config.max_ctx:
            raise ValueError(f"prompt ({longest}) + max_new ({max_new}) exceeds the model's "
                             f"{self.config.max_ctx} learned positions")
        if not isinstance(pad_to, int) or pad_to < 1:
            raise ValueError(f"pad_to must be an integer >= 1, got {pad_to!r}")
        # Left-pad to a multiple of pad_to so prompts of similar length share one compiled function.
        T0 = -(-longest // pad_to) * pad_to
        prompt_BxT = np.array([[0] * (T0 - len(r)) + r for r in rows], np.int32)
        mask_BxT = np.array([[0] * (T0 - len(r)) + [1] * len(r) for r in rows], np.int32)
        prompt_BxT, mask_BxT = self._check_tokens(prompt_BxT, mask_BxT)
        edits = self._check_edits(edits)
        eos = self.config.eos_id
        fill = self.config.pad_id if self.config.pad_id is not None else eos
        plan = GenPlan(
            sites=transformer.Sites((), tuple(e.static_key() for e in edits)), max_new=int(max_new),
            greedy=sampling.temperature == 0.0, top_k=sampling.top_k, use_top_p=sampling.top_p is not None,
            stop_at_eos=bool(stop_at_eos), eos_id=int(eos), fill_id=int(fill), return_logits=bool(return_logits))
        fn = self._compiled_fn(("generate", plan), lambda: jax.jit(functools.partial(generate_core, self.config, plan)))
        key = jax.random.key(0) if key is None else key
        temperature = jnp.float32(sampling.temperature if sampling.temperature > 0 else 1.0)
        top_p = jnp.float32(sampling.top_p if sampling.top_p is not None else 1.0)
        tokens_BxN, logits_BxNxV = fn(params, prompt_BxT, mask_BxT, [e.dynamic_args() for e in edits],
                                      key, temperature, top_p)
        unbatch = lambda a: np.asarray(a)[0] if single else np.asarray(a)  # noqa: E731
        return (unbatch(tokens_BxN), unbatch(logits_BxNxV)) if return_logits else unbatch(tokens_BxN)

    # ---- chat ---------------------------------------------------------------------------

    def chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """ChatML as in SmolLM2-Instruct: '<|im_start|>{role}\\n{content}<|im_end|>\\n' per message,
        a default system turn (chat_system_prompt) first if the conversation has none, and
        '<|im_start|>assistant\\n' when add_generation_prompt."""
        parts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
            if i == 0 and m["role"] != "system" and self.chat_system_prompt is not None:
                parts.append(f"<|im_start|>system\n{self.chat_system_prompt}<|im_end|>\n")
            parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    # ---- internals ----------------------------------------------------------------------

    def _compiled_fn(self, key, build):
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = build()
            while len(self._compiled) > _MAX_COMPILED:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return fn

    def _check_tokens(self, tokens_BxT, mask_BxT):
        if isinstance(tokens_BxT, jax.core.Tracer) or isinstance(mask_BxT, jax.core.Tracer):
            # called inside the caller's own jit/vmap/grad: only shapes can be checked
            if tokens_BxT.ndim != 2:
                raise ValueError(f"tokens must be [batch, time], got shape {tokens_BxT.shape}")
            mask = jnp.ones(tokens_BxT.shape, jnp.int32) if mask_BxT is None else (mask_BxT != 0).astype(jnp.int32)
            return tokens_BxT.astype(jnp.int32), mask
        tok = np.asarray(tokens_BxT)
        if tok.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tok.shape}; wrap one sequence as [seq]")
        if not np.issubdtype(tok.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {tok.dtype}")
        if tok.size and (tok.min() < 0 or tok.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got range "
                             f"[{tok.min()}, {tok.max()}]")
        mask = np.ones(tok.shape, np.int32) if mask_BxT is None else np.asarray(mask_BxT)
        if mask.shape != tok.shape:
            raise ValueError(f"attention_mask shape {mask.shape} must equal tokens shape {tok.shape}")
        mask = (mask != 0).astype(np.int32)
        if self.config.arch == "gpt2" and tok.size and mask.sum(1).max() > self.config.max_ctx:
            raise ValueError(f"sequence longer than the model's {self.config.max_ctx} learned positions")
        return jnp.asarray(tok, jnp.int32), jnp.asarray(mask)

    def _check_edits(self, edits) -> tuple[Edit, ...]:
        edits = (edits,) if isinstance(edits, Edit) else tuple(edits)
        for e in edits:
            if not isinstance(e, Edit):
                raise ValueError(f"edits must be Edit objects (use add/clamp/replace), got {type(e).__name__}")
            d = self.hook_dim(e.hook)
            if e.vector is not None and e.vector.shape != (d,):
                raise ValueError(f"{e.kind} edit at {e.hook} needs a vector of width {d}, got {e.vector.shape}")
        return edits


def check_compute_dtype(compute_dtype) -> str:
    """The compute dtype's name ("float32" or "bfloat16"; numpy/jax dtypes accepted), else ConfigError."""
    try:
        name = jnp.dtype(compute_dtype).name
    except TypeError:
        name = None
    if name not in transformer.COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {', '.join(transformer.COMPUTE_DTYPES)}, "
                          f"got {compute_dtype!r}")
    return name


def _check_config(cfg: ModelConfig) -> None:
    if cfg.arch not in transformer.ARCHS:
        raise ValueError(f"unknown arch {cfg.arch!r}; supported: {sorted(transformer.ARCHS)}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"n_heads ({cfg.n_heads}) must be a multiple of n_kv_heads ({cfg.n_kv_heads})")
    if cfg.arch == "llama" and cfg.head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {cfg.head_dim}")
    if cfg.arch == "gpt2" and (cfg.n_kv_heads != cfg.n_heads or cfg.n_heads * cfg.head_dim != cfg.d_model):
        raise ValueError("gpt2 needs n_kv_heads == n_heads and n_heads * head_dim == d_model")
