"""Configuration dataclasses for sparse autoencoders and their training.

`SAEConfig` describes one SAE (architecture, sizes, hooks, per-SAE hyperparameters and, once trained,
the input/output scales that were folded into its saved weights). `TrainConfig` describes the shared
training loop (batch size, token budget, seed, logging, checkpoints, mesh), so several SAEs can be
trained from one stream of batches.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")


class SAEConfigError(ValueError):
    """A configuration that cannot be trained or loaded; the message names the fix."""


@dataclass
class SAEConfig:
    """One sparse autoencoder (or transcoder when hook_out != hook_in).

    Sizes: d_in (width of hook_in), d_out (width of hook_out; == d_in for an SAE), width = F latents.
    k: active latents per token for TopK/Matryoshka-TopK; mean active latents per token for
    BatchTopK/Matryoshka-BatchTopK (top k·B over a batch of B tokens); for JumpReLU the L0 its
    thresholds are initialised to (the L0 penalty moves it from there); unused by ReLU and Gated.
    Normalisation: training sees x·input_scale and y·output_scale with scale = sqrt(d / E‖x‖²)
    (so E‖x‖² = d); `normalisation_folded` says the saved weights already absorb them (see saes/io.py).
    """

    architecture: str = "topk"
    d_in: int = 0
    width: int = 0
    k: int = 32
    hook_in: str = ""
    hook_out: str = ""  # "" -> hook_in (plain SAE); another hook makes a transcoder
    d_out: int = 0  # 0 -> d_in
    model_id: str = ""
    store_fingerprint: str = ""
    # Normalisation (filled in by the trainer from store.stats / a sample of the stream).
    normalisation_folded: bool = False
    input_scale: float = 1.0
    output_scale: float = 1.0
    # Per-SAE optimisation (several SAEs in one pass may differ here).
    # Peak Adam lr. 2e-3 suits the short runs of a ~100k-token store trained for a few epochs (a few
    # hundred steps); 0 -> 2e-4 / sqrt(width / 2**14), the common default for long runs (RESEARCH.md).
    lr: float = 2e-3
    l1_coef: float = 5.0  # ReLU+L1 and Gated sparsity coefficient (on unit-scaled inputs)
    l0_coef: float = 1.0  # JumpReLU L0 coefficient (loss per token = ‖e‖² + l0_coef·L0, E‖x‖² = d_in units)
    sparsity_warmup_frac: float = 0.05  # sparsity coefficient ramps linearly 0 -> coef over this share of steps
    jumprelu_bandwidth: float = 0.05  # rectangle-kernel width ε of the straight-through estimators
    jumprelu_init_threshold: float = 0.1
    k_aux: int = 256  # AuxK: number of dead latents that reconstruct the residual (OpenAI: 256)
    auxk_coef: float = 1.0 / 32.0
    dead_tokens: int = 0  # a latent that has not fired for this many tokens is dead; 0 -> min(10M, tokens/10)
    # EMA decay of the BatchTopK inference threshold: a ~10-step memory follows the batch threshold as it
    # falls during training (0.99 lagged ~40% behind on a 150-step run).
    batchtopk_threshold_decay: float = 0.9
    matryoshka_prefixes: tuple[int, ...] = ()  # nested prefix sizes; () -> width/16, /8, /4, /2, 1
    matryoshka_base: str = "batchtopk"  # "batchtopk" or "topk"
    init_seed_offset: int = 0  # per-SAE key = fold_in(seed, index + offset)

    def __post_init__(self) -> None:
        if not self.hook_out:
            self.hook_out = self.hook_in
        if not self.d_out:
            self.d_out = self.d_in
        if isinstance(self.matryoshka_prefixes, list):
            self.matryoshka_prefixes = tuple(int(p) for p in self.matryoshka_prefixes)

    @property
    def is_transcoder(self) -> bool:
        return self.hook_out != self.hook_in

    @property
    def selection(self) -> str:
        """How latents are chosen at training time: relu|topk|batchtopk|jumprelu|gated."""
        if self.architecture == "matryoshka":
            return self.matryoshka_base
        return self.architecture

    @property
    def learning_rate(self) -> float:
        if self.lr > 0:
            return self.lr
        return 2e-4 / math.sqrt(self.width / 2**14)

    def prefixes(self) -> tuple[int, ...]:
        """Matryoshka prefix sizes, strictly increasing and ending at width."""
        if self.matryoshka_prefixes:
            return tuple(self.matryoshka_prefixes)
        sizes = sorted({max(1, self.width // d) for d in (16, 8, 4, 2)} | {self.width})
        return tuple(sizes)

    def validate(self) -> "SAEConfig":
        """Raise SAEConfigError naming the problem and the fix."""
        if self.architecture not in ARCHITECTURES:
            raise SAEConfigError(
                f"unknown SAE architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        if self.d_in <= 0 or self.width <= 0:
            raise SAEConfigError(f"d_in and width must be positive (got d_in={self.d_in}, width={self.width})")
        if not self.hook_in:
            raise SAEConfigError("hook_in is empty; pass the store hook to read, e.g. resid_post.15")
        if self.selection in ("topk", "batchtopk"):
            if not 0 < self.k <= self.width:
                raise SAEConfigError(
                    f"k={self.k} must be in 1..width={self.width} for {self.architecture}; lower k or raise width"
                )
        if self.architecture == "matryoshka":
            if self.matryoshka_base not in ("topk", "batchtopk"):
                raise SAEConfigError(
                    f"matryoshka_base must be 'topk' or 'batchtopk', got {self.matryoshka_base!r}"
                )
            p = self.prefixes()
            if any(b <= a for a, b in zip(p, p[1:])) or p[0] <= 0 or p[-1] != self.width:
                raise SAEConfigError(
                    f"matryoshka_prefixes {p} must be strictly increasing, positive and end at width={self.width}"
                )
        if self.k_aux < 0 or self.auxk_coef < 0:
            raise SAEConfigError("k_aux and auxk_coef must be >= 0")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["matryoshka_prefixes"] = list(self.matryoshka_prefixes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"train"}
        if unknown:
            raise SAEConfigError(f"unknown SAEConfig keys {sorted(unknown)}; the file was written by another version?")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    """The shared training loop. All SAEs trained together see the same batches."""

    batch_size: int = 2048
    total_tokens: int = 600_000
    seed: int = 0
    warmup_steps: int = 100  # linear lr warmup (capped at a tenth of the steps)
    decay_frac: float = 0.2  # linear decay to 0 over the final share of steps
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip per SAE
    compute_dtype: str = "float32"  # "bfloat16" computes encoder/decoder matmuls in bf16 (params stay fp32)
    geometric_median_samples: int = 8192  # tokens used to initialise b_dec (0 -> zeros)
    log_every: int = 50
    eval_every: int = 0  # 0 -> only at the end
    checkpoint_every: int = 500  # steps; 0 -> only at the end
    keep_checkpoints: int = 2
    mesh_data: int = 1
    mesh_feature: int = 1
    split: str = "train"
    exclude_bos: bool = True

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Lines `key: old -> new` for every differing leaf of two nested dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


__all__ = ["ARCHITECTURES", "TOPK_FAMILY", "SAEConfig", "SAEConfigError", "TrainConfig", "config_diff"]
