"""Architecture hyper-parameters shared by every model in the zoo."""
from __future__ import annotations

from dataclasses import dataclass

from featureatlas.activation_store.configs import Config
from featureatlas.activation_store.errors import ConfigError

HOOK_KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_hidden", "mlp_out", "resid_post")
"""The hook sites of every layer L (named `<kind>.L`), in the order one block computes them
(transformer.py `block`). The one list of hook kinds: everything that names, validates or orders
hooks imports it."""

TRANSFORMERLENS_HOOKS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "resid_mid": "hook_resid_mid",
                         "mlp_hidden": "mlp.hook_post", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}
"""Each hook kind's TransformerLens name inside block L (`blocks.L.<name>`), what SAELens's `hook_name` and
Neuronpedia's `hookName` hold. The one such table: saes/saelens.py and eval/catalog.py import it."""
_FROM_TRANSFORMERLENS = {tl: kind for kind, tl in TRANSFORMERLENS_HOOKS.items()}


def to_transformerlens(hook: str) -> str | None:
    """`blocks.L.<TransformerLens name>` for our `kind.L` hook (resid_post.15 -> blocks.15.hook_resid_post);
    None for a name that is not a hook kind followed by a layer number."""
    kind, _, layer = hook.partition(".")
    if kind in TRANSFORMERLENS_HOOKS and layer.isascii() and layer.isdigit():
        return f"blocks.{layer}.{TRANSFORMERLENS_HOOKS[kind]}"
    return None


def from_transformerlens(name: str) -> str | None:
    """Our `kind.L` hook for a TransformerLens name (blocks.15.mlp.hook_post -> mlp_hidden.15); None if it
    names no hook kind of HOOK_KINDS."""
    blocks, _, rest = name.partition(".")
    layer, _, site = rest.partition(".")
    kind = _FROM_TRANSFORMERLENS.get(site)
    if blocks == "blocks" and layer.isascii() and layer.isdigit() and kind:
        return f"{kind}.{layer}"
    return None


@dataclass(frozen=True)
class ModelConfig(Config):
    """Decoder-only transformer shape.

    arch: "llama" (RMSNorm, RoPE, gated MLP; covers SmolLM2, Llama 3, Qwen2, Mistral)
    or "gpt2" (LayerNorm, learned positions, GELU MLP).
    """

    arch: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_ctx: int = 8192
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tied_embeddings: bool = True
    qkv_bias: bool = False
    activation: str = "silu"  # llama: silu (gate), gpt2: gelu_new
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int | None = None

    def hook_names(self) -> tuple[str, ...]:
        return tuple(f"{kind}.{layer}" for layer in range(self.n_layers) for kind in HOOK_KINDS)

    def check_hook(self, hook: str, model_id: str = "this model") -> tuple[str, int]:
        """(kind, layer) of a valid hook name, else ConfigError listing the valid ones (no weights needed)."""
        kind, _, layer = hook.rpartition(".") if isinstance(hook, str) else ("", "", "")
        if kind not in HOOK_KINDS or not layer.isdigit() or int(layer) >= self.n_layers or layer != str(int(layer)):
            last = self.n_layers - 1
            valid = ", ".join(f"{k}.0-{last}" if last else f"{k}.0" for k in HOOK_KINDS)
            raise ConfigError(f"unknown hook {hook!r} for {model_id}; valid hooks: {valid}")
        return kind, int(layer)
