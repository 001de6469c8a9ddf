"""Configuration dataclasses for sparse autoencoders and their training (each setting written once:
the command line's flags, help and checks derive from these fields; activation_store/configs.py).

`SAEConfig` describes one SAE (architecture, sizes, hooks, per-SAE hyperparameters and, once trained,
the input/output scales that were folded into its saved weights). `SAETrainConfig` describes the
shared training loop (batch size, token budget, seed, logging, checkpoints, mesh, which tokens), so
several SAEs can be trained from one stream of batches.
"""
from __future__ import annotations

from dataclasses import dataclass

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.saes.architectures import ARCHITECTURES, Matryoshka, architecture

SAEConfigError = ConfigError  # the former name of an SAE's configuration error

DEFAULT_K_AUX = 256


@dataclass
class SAEConfig(Config):
    """One sparse autoencoder (or transcoder when hook_out != hook_in).

    Normalisation: training sees x·input_scale and y·output_scale with scale = sqrt(d / E‖x‖²)
    (so E‖x‖² = d); `normalisation_folded` says the saved weights already absorb them (see saes/io.py).
    """

    architecture: str = setting("topk", flag="--arch", choices=tuple(ARCHITECTURES))
    """relu (L1), topk, batchtopk (saved as JumpReLU), jumprelu (L0), gated, matryoshka (nested prefixes)."""
    hook_in: str = setting("", flag="--hook")
    """Hook to read, e.g. resid_post.15."""
    hook_out: str = setting("")
    """Hook to reconstruct; a hook other than --hook trains a transcoder ("" = the same hook)."""
    width: int | None = setting(None, gt=0)
    """Number of latents F; when not given, --expansion x d_in."""
    expansion: float = setting(8.0, gt=0)
    """Width as a multiple of d_in, used when --width is not given."""
    k: int = setting(32, gt=0)
    """Active latents per token (TopK, Matryoshka-TopK) or on average (BatchTopK: top k·B of a batch of B
    tokens); JumpReLU starts its thresholds at this L0. Unused by relu and gated."""
    lr: float = setting(2e-3, gt=0)
    """Peak Adam learning rate; 2e-3 suits a few hundred steps on a ~100k-token store; long runs usually
    take 2e-4 / sqrt(width / 2^14)."""
    l1_coef: float = setting(5.0, flag="--l1", ge=0)
    """L1 coefficient of relu and gated (on inputs normalised to E||x||^2 = d_in)."""
    l0_coef: float = setting(1.0, ge=0)
    """L0 coefficient of jumprelu (loss per token = ||e||^2 + l0_coef·L0, in E||x||^2 = d_in units)."""
    sparsity_warmup_frac: float = setting(0.05, flag="--sparsity-warmup", ge=0, le=1)
    """Fraction of the steps over which the L1/L0 coefficient ramps up linearly from 0."""
    jumprelu_bandwidth: float = setting(0.05, flag="--bandwidth", gt=0)
    """Width ε of jumprelu's straight-through rectangle kernel."""
    jumprelu_init_threshold: float = setting(0.1, gt=0)
    """Smallest initial jumprelu threshold (thresholds start at the quantile giving L0 = k)."""
    k_aux: int = setting(DEFAULT_K_AUX, ge=0)
    """AuxK (TopK family): dead latents that reconstruct the residual (Gao et al.: 256; the default is
    capped at the width)."""
    auxk_coef: float = setting(1.0 / 32.0, ge=0)
    """AuxK loss coefficient (0 disables AuxK)."""
    dead_tokens: int = setting(0, ge=0)
    """A latent that has not fired for this many tokens is dead (0: min(10M, tokens/10))."""
    batchtopk_threshold_decay: float = setting(0.9, ge=0, lt=1)
    """EMA decay of BatchTopK's inference threshold: a ~10-step memory follows the batch threshold as it
    falls during training (0.99 lagged ~40% behind on a 150-step run)."""
    matryoshka_prefixes: tuple[int, ...] = setting((), flag="--prefixes")
    """Matryoshka nested prefix sizes, increasing and ending at the width (default F/16 F/8 F/4 F/2 F;
    in --sae colon-separated, e.g. prefixes=288:1152:4608)."""
    matryoshka_base: str = setting("batchtopk", choices=Matryoshka.bases)
    """How Matryoshka chooses its active latents."""
    init_seed_offset: int = setting(0)
    """Per-SAE initialisation key = fold_in(seed, index + offset)."""
    d_in: int = setting(0, ge=0, cli=False)
    """Width of hook_in (0: taken from the store)."""
    d_out: int = setting(0, ge=0, cli=False)
    """Width of hook_out (0: taken from the store; = d_in for a plain SAE)."""
    model_id: str = setting("", cli=False)
    """The model the activations come from."""
    store_fingerprint: str = setting("", cli=False)
    """Corpus fingerprint of the store trained on."""
    normalisation_folded: bool = setting(False, cli=False)
    """The saved weights absorb input_scale/output_scale (saes/io.py)."""
    input_scale: float = setting(1.0, cli=False)
    """s_in = sqrt(d_in / E||x||^2) of the training data (filled in by the trainer)."""
    output_scale: float = setting(1.0, cli=False)
    """s_out = sqrt(d_out / E||y||^2) of the training targets (filled in by the trainer)."""

    def __post_init__(self) -> None:
        if not self.hook_out:
            self.hook_out = self.hook_in
        if not self.d_out:
            self.d_out = self.d_in
        if isinstance(self.matryoshka_prefixes, (list, tuple)):
            self.matryoshka_prefixes = tuple(int(p) for p in self.matryoshka_prefixes)

    @property
    def is_transcoder(self) -> bool:
        return self.hook_out != self.hook_in

    @property
    def selection(self) -> str:
        """The architecture that chooses the latents at training time (Matryoshka: its base)."""
        return architecture(self).selection(self).name

    def prefixes(self) -> tuple[int, ...]:
        """Matryoshka prefix sizes, strictly increasing and ending at width."""
        if self.matryoshka_prefixes:
            return tuple(self.matryoshka_prefixes)
        return tuple(sorted({max(1, self.width // d) for d in (16, 8, 4, 2)} | {self.width}))

    def check_structure(self) -> "SAEConfig":
        """What a saved SAE needs to run: a known architecture, positive sizes, a hook, a valid k."""
        arch = architecture(self)
        if self.d_in <= 0 or not self.width:
            raise ConfigError(f"d_in and --width must be positive (got d_in={self.d_in}, width={self.width})")
        if not self.hook_in:
            raise ConfigError("no hook: pass --hook with the store hook to read, e.g. resid_post.15")
        arch.validate(self)
        return self

    def validate(self) -> "SAEConfig":
        """Raise ConfigError naming the flag and the fix (declared ranges, then cross-field checks)."""
        architecture(self)  # an unknown architecture first, with the list of known ones
        super().validate()
        self.check_structure()
        uses_auxk = architecture(self).selection(self).uses_auxk
        # Only an explicit --k-aux is refused: the default is capped at the width instead.
        if uses_auxk and self.auxk_coef > 0 and self.k_aux != DEFAULT_K_AUX and self.k_aux > self.width:
            raise ConfigError(f"--k-aux {self.k_aux} is larger than the width {self.width}: AuxK uses at most "
                              "width dead latents; choose --k-aux <= --width (or 0 to turn AuxK off)")
        return self


@dataclass
class SAETrainConfig(Config):
    """The shared training loop. All SAEs trained together see the same batches."""

    batch_size: int = setting(2048, gt=0)
    """Tokens per step."""
    total_tokens: int = setting(600_000, flag="--tokens", gt=0)
    """Training tokens (epochs repeat the store)."""
    seed: int = setting(0)
    """Seed of initialisation and batch order."""
    warmup_steps: int = setting(100, ge=0)
    """Linear learning-rate warmup steps (capped at a tenth of the run)."""
    decay_frac: float = setting(0.2, ge=0, le=0.9)
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    adam_b1: float = setting(0.9, ge=0, lt=1)
    """Adam β1."""
    adam_b2: float = setting(0.999, ge=0, lt=1)
    """Adam β2."""
    adam_eps: float = setting(1e-8, gt=0)
    """Adam ε."""
    grad_clip: float = setting(1.0, ge=0)
    """Global gradient-norm clip per SAE (0 = off)."""
    compute_dtype: str = setting("float32", flag="--dtype", choices=("float32", "bfloat16"))
    """Compute dtype. bfloat16: matmuls (forward and backward), the top-k selection and the sparse products
    read bfloat16 operands, every sum is float32; parameters, optimizer state and the saved SAE stay float32.
    Pays off on GPUs/TPUs; on CPU float32 is as fast."""
    geometric_median_samples: int = setting(8192, ge=0)
    """Tokens used to initialise b_dec at their geometric median (0: zeros)."""
    log_every: int = setting(50, gt=0)
    """Steps between metrics.jsonl rows (metrics stay on the device in between)."""
    eval_every: int = setting(0, ge=0)
    """Steps between validation evaluations (0: only at the end)."""
    checkpoint_every: int = setting(500, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = setting(2, ge=1)
    """Checkpoints kept in out/checkpoints."""
    mesh_data: int = setting(1, ge=1, cli=False)
    """Devices the batch is split over (--mesh data=N)."""
    mesh_feature: int = setting(1, ge=1, cli=False)
    """Devices the latents are split over (--mesh feature=N)."""
    split: str = setting("train", choices=("train", "all"))
    """Store split to train on."""
    exclude_bos: bool = setting(True)
    """Leave BOS tokens out of training."""
    exclude_massive: bool = setting(False)
    """Leave massive-activation tokens out of training (norm above 4x the median; activation_store/massive.py)."""

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def validate(self) -> "SAETrainConfig":
        super().validate()
        if self.batch_size % self.mesh_data:
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by the mesh data axis "
                              f"{self.mesh_data}; choose a multiple of it")
        return self


__all__ = ["ARCHITECTURES", "DEFAULT_K_AUX", "SAEConfig", "SAEConfigError", "SAETrainConfig"]
