"""Shared SAE skeleton: h = W_enc^T (x - b_dec) + b_enc, z = gate(h), x_hat = W_dec^T z + b_dec.

Pure torch (no Lightning/Hydra/W&B). Each architecture subclasses `SAE` and supplies the gate
(`activation`) and its extra loss terms (`aux_losses`). All inputs are in *normalised* units:
the training module multiplies raw activations by `act_scale` (E||x|| = sqrt(d_in)) and the
export folds that factor back into the weights so the saved SAE works on raw activations.

Training, unless `rsae.sae.fast.disabled()`: the encoder GEMM runs without the input-gradient GEMM
that b_dec would otherwise cost, and the dead-latent counter updates without a host sync. What a
compiled, captured or DDP step needs of an SAE is `rsae.sae.fast_step.StepHooks`, which it inherits.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from rsae.errors import ConfigError, require  # noqa: F401  (re-exported for the architectures)
from rsae.sae import fast
from rsae.sae.fast_step import StepHooks
from rsae.sae.output import SAEOutput  # noqa: F401  (re-exported for the architectures)


def resolve_d_sae(d_in: int, d_sae: int | None, expansion_factor: int | None) -> int:
    """Width from an explicit `d_sae` or from `expansion_factor * d_in` (exactly one of them)."""
    require((d_sae is None) != (expansion_factor is None), "give exactly one of d_sae and expansion_factor")
    if d_sae is None:
        require(isinstance(expansion_factor, int) and expansion_factor >= 1, f"expansion_factor must be a positive integer, got {expansion_factor!r}")
        d_sae = expansion_factor * d_in
    return d_sae


# The registry: exported `architecture` (SAELens names, plus our own) -> class. A class registers
# itself by declaring `architecture` (and any `aliases`); `rsae.io.saelens.build_sae` looks here.
ARCHITECTURES: dict[str, type["SAE"]] = {}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class SAE(StepHooks, nn.Module):
    """Base class. Subclasses set `architecture` and override `activation` / `aux_losses`."""

    architecture: str = "base"
    aliases: tuple[str, ...] = ()  # other names an export may use for this class
    # The sparsity mechanism of a fixed-gate SAE (relu | jumprelu | topk | batchtopk, the files of
    # `rsae.sae.mechanisms`, or an architecture's own, e.g. gated, with `upgrade_threshold`): what an
    # upgrade's rational mask reproduces. None: not an upgrade teacher.
    mechanism: str | None = None
    # The skeleton tensors the export carries (besides those `export_fields` names); an architecture
    # whose encoder biases are its own (GatedSAE's b_gate, b_mag) leaves out b_enc.
    export_skeleton: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "architecture" in cls.__dict__:  # registers itself (a subclass without its own name does not)
            names = (cls.architecture, *cls.__dict__.get("aliases", ()))
            for name in names:  # all checked before any registers (a module reload re-registers its own)
                taken = ARCHITECTURES.get(name)
                if taken is not None and _qualified(taken) != _qualified(cls):
                    raise TypeError(f"architecture name {name!r} of {_qualified(cls)} is already taken by {_qualified(taken)}")
            ARCHITECTURES.update(dict.fromkeys(names, cls))

    def __init__(
        self,
        d_in: int,
        d_sae: int | None = None,
        expansion_factor: int | None = None,
        unit_norm_decoder: bool = True,
        init_seed: int | None = 0,
        dead_after_tokens: int = 1_000_000,
    ) -> None:
        super().__init__()
        require(isinstance(d_in, int) and d_in >= 1, f"d_in must be a positive integer, got {d_in!r}")
        d_sae = resolve_d_sae(d_in, d_sae, expansion_factor)
        require(isinstance(d_sae, int) and d_sae >= 1, f"d_sae must be a positive integer, got {d_sae!r}")
        require(dead_after_tokens >= 1, f"dead_after_tokens must be >= 1, got {dead_after_tokens}")
        self.d_in, self.d_sae = d_in, d_sae
        self.unit_norm_decoder = unit_norm_decoder
        self.dead_after_tokens = dead_after_tokens

        gen = torch.Generator().manual_seed(init_seed) if init_seed is not None else None
        w_dec = torch.randn(d_sae, d_in, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * 0.1  # small rows; unit-normed below if asked
        if unit_norm_decoder:
            w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())  # W_enc initialised as W_dec^T
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # Tokens since each latent last fired (dead-latent tracking; AuxK uses it). A buffer so
        # checkpoints carry it and a resumed run continues identically.
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    # --- the skeleton -------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        if fast.enabled():  # the same h, without the input-gradient GEMM (see rsae.sae.fast)
            return fast.linear_encoder(x, self.W_enc, self.b_enc, self.b_dec)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, h: Tensor) -> Tensor:  # the gate phi
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.pre_acts(x))

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # --- training -----------------------------------------------------------------------------
    def training_output(self, x: Tensor, step: int = 0) -> SAEOutput:
        """Forward pass plus the weighted loss terms (`mse` plus the architecture's own)."""
        self._check_input(x)
        h = self.pre_acts(x)
        z, z_abs_sums = self.training_codes(h)
        self._decoder_boundary()
        x_hat = self.decode(z)
        out = SAEOutput(x_hat=x_hat, z=z, h=h, z_abs_sums=z_abs_sums)
        out.losses["mse"] = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        aux = self.aux_losses(x, out, step)  # (a statement: TopK's AuxK breaks a compiled graph here,
        out.losses.update(aux)  # and a break with the losses' dict on the stack would guard on that dict)
        if self.training:
            self._track_firing(z, z_abs_sums)
        return out

    def training_codes(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """(z, the sums of |z| over the batch or None): an architecture whose gate can sum |z| in
        the same pass returns them (see `SAEOutput.z_abs_sums`)."""
        return self.activation(h), None

    def aux_losses(self, x: Tensor, out: SAEOutput, step: int) -> dict[str, Tensor]:
        return {}

    @torch.no_grad()
    def _track_firing(self, z: Tensor, z_abs_sums: Tensor | None = None) -> None:
        # A sum of |z| is 0 exactly when every z is (NaN included: NaN != 0), so it answers "fired"
        # without another pass over z.
        fired = (z != 0).any(dim=0) if z_abs_sums is None else z_abs_sums != 0
        if fast.enabled():  # no boolean-mask assignment: the host does not wait for the GPU
            fast.mark_fired(self.tokens_since_fired, fired, z.shape[0])
            return
        self.tokens_since_fired += z.shape[0]
        self.tokens_since_fired[fired] = 0

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[-1] != self.d_in:
            raise ConfigError(f"expected activations of shape [batch, {self.d_in}], got {list(x.shape)}")

    # --- decoder norm constraint --------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each decoder row (keeps rows on the sphere)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g -= (g * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # --- what the jobs ask of an architecture -------------------------------------------------
    def sparsity_lever(self) -> str | None:
        """The attribute (a loss coefficient) a controller such as HoldL0 adapts to move L0; None
        when L0 is fixed by construction (TopK's k)."""
        return None

    def configure_control(self, coefficients: dict[str, float]) -> None:
        """Make this SAE the compute-matched control of an upgrade (the teacher fine-tuned with its
        own gate and loss): its sparsity lever takes the value named for it in `coefficients`."""
        lever = self.sparsity_lever()
        if lever is not None:
            setattr(self, lever, float(coefficients[lever]))

    def upgrade_threshold(self) -> Tensor | None:
        """Per-latent thresholds [d_sae] (float32) the mechanism applies at inference, if any: an
        upgrade reproduces it with the rational SAE's jumprelu mask at these thresholds."""
        return None

    def skeleton_weights(self) -> dict[str, Tensor]:
        """W_enc, b_enc, W_dec, b_dec of the skeleton form `h = (x - b_dec) @ W_enc + b_enc` that
        `pre_acts` computes and `decode`: what an upgrade copies into the rational SAE."""
        return {name: getattr(self, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers this architecture asks for, by parameter-name prefix (the
        training module applies them; `module.lr_scales` entries win)."""
        return {}

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def train_metrics(self) -> dict[str, Tensor]:
        """Architecture-specific state logged with the training metrics (`train/<name>`), as device
        tensors: e.g. the rational gate's shape, which drifts during an upgrade's fine-tune."""
        return {}

    # --- export -------------------------------------------------------------------------------
    def export_config(self) -> dict:
        """Architecture-specific fields of the SAELens-layout `cfg.json` (besides d_in/d_sae)."""
        return {"architecture": self.architecture}

    def export_tensors(self, scale: float = 1.0) -> dict[str, Tensor]:
        """Weights for raw activations: the model saw `scale * x`, so fold `scale` in.

        h = W_enc^T (s x - b_dec) + b_enc = (s W_enc)^T (x - b_dec / s) + b_enc and
        x_hat_raw = (W_dec^T z + b_dec) / s, so W_enc -> s W_enc, W_dec -> W_dec / s, b_dec -> b_dec / s.
        """
        out = {}
        for name in self.export_skeleton:  # (b_enc is left as it is)
            t = getattr(self, name).detach()
            t = t * scale if name == "W_enc" else t / scale if name in ("W_dec", "b_dec") else t
            out[name] = t.float().contiguous()
        return out

    def rescaled(self, scale: float) -> "SAE":
        """A copy that acts on `x` as this SAE acts on `scale * x` (outputs divided by `scale`):
        `rescaled(s)` turns a normalised-unit SAE into a raw-unit one, `rescaled(1 / s)` back."""
        out = copy.deepcopy(self)
        out.load_exported(self.export_tensors(scale), self.export_config())
        return out

    @classmethod
    def export_fields(cls, read) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
        """This architecture's own `cfg.json` fields, checked as they are read (`read`: an
        `rsae.io.checks.FieldReader`, whose errors name the file and the field), and the tensors
        besides W_enc, b_enc, W_dec, b_dec they imply: name -> (shape, why). `kwargs_from_export`
        receives these fields."""
        return {}, {}

    @classmethod
    def centre_input(cls, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """An export whose encoder reads x, not x - b_dec (SAELens `apply_b_dec_to_input: false`), as
        the same encoder in our form: x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)."""
        return {**tensors, "b_enc": tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]}

    @classmethod
    def kwargs_from_export(cls, cfg: dict) -> dict:
        """Constructor arguments (besides d_in/d_sae) recorded in an exported `cfg.json`."""
        return {}

    def load_exported(self, tensors: dict[str, Tensor], cfg: dict) -> None:
        """Inverse of `export_tensors` at scale 1 (exported weights already act on raw inputs)."""
        with torch.no_grad():
            for name in self.export_skeleton:
                t = tensors[name]
                p = getattr(self, name)
                require(t.shape == p.shape, f"{name}: expected shape {list(p.shape)}, got {list(t.shape)}")
                p.copy_(t)
