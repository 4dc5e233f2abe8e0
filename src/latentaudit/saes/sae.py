"""The one canonical sparse autoencoder every format is converted to.

Layout (the same for every source format, converted at load time):

- ``W_enc`` [d_model, d_sae], ``b_enc`` [d_sae]
- ``W_dec`` [d_sae, d_model], ``b_dec`` [d_model]
- activation ``relu`` | ``jumprelu`` (needs ``threshold`` [d_sae]) | ``topk`` (needs ``k``)
- ``subtract_b_dec``: encode ``x - b_dec`` (SAELens, sparsify, OpenAI) or ``x`` (Gemma Scope)
- ``input_norm``: ``none`` or ``layer_norm`` (OpenAI's normalised autoencoders: the input is
  centred and scaled per token before encoding and the reconstruction scaled back)
- ``mean_activation`` [d_model] (optional): ā, the mean hook activation over reference text,
  used by attribution's mean ablation.

Encoding: ``f = act((x' - b_dec·s) @ W_enc + b_enc)``; decoding ``x̂ = f @ W_dec + b_dec``.
Attribution uses only the unit-normalised decoder rows (:meth:`SAE.decoder_directions`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from latentaudit.errors import LatentAuditError, ShapeMismatchError

ACTIVATIONS = ("relu", "jumprelu", "topk")
INPUT_NORMS = ("none", "layer_norm")
FORMAT_NAME = "latentaudit"
SCHEMA_VERSION = 1
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


@dataclass
class SAEInfo:
    """Where an SAE belongs and where it came from (everything but the weights)."""

    activation: str = "relu"
    """Nonlinearity: relu, jumprelu or topk."""
    k: int | None = None
    """Number of active latents per token for topk."""
    subtract_b_dec: bool = True
    """Subtract b_dec from the input before encoding."""
    input_norm: str = "none"
    """Per-token input normalisation: none or layer_norm."""
    model: str | None = None
    """The model the SAE was trained on (name or path), if known."""
    layer: int | None = None
    """0-indexed decoder layer whose output (resid_post) the SAE reads, if known."""
    hook: str = "resid_post"
    """Hook point name."""
    source_format: str = FORMAT_NAME
    """The file format it was loaded from."""
    source_path: str | None = None
    """The file or folder it was loaded from."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else recorded with the SAE (training data, metrics, ...)."""
    hub: dict[str, Any] | None = None
    """Where a hub SAE came from: repo, revision (commit hash), path, sha256 of each file."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise LatentAuditError(
                f"SAE activation '{self.activation}' is not one of {', '.join(ACTIVATIONS)}.")
        if self.activation == "topk" and (self.k is None or self.k < 1):
            raise LatentAuditError("A topk SAE needs a positive k.")
        if self.input_norm not in INPUT_NORMS:
            raise LatentAuditError(
                f"SAE input_norm '{self.input_norm}' is not one of {', '.join(INPUT_NORMS)}.")


class SAE(nn.Module):
    """A sparse autoencoder in latentaudit's canonical layout (see the module docstring)."""

    def __init__(self, W_enc: Float[Tensor, "d_model d_sae"], b_enc: Float[Tensor, " d_sae"],
                 W_dec: Float[Tensor, "d_sae d_model"], b_dec: Float[Tensor, " d_model"],
                 info: SAEInfo | None = None, threshold: Float[Tensor, " d_sae"] | None = None,
                 mean_activation: Float[Tensor, " d_model"] | None = None) -> None:
        super().__init__()
        self.info = info or SAEInfo()
        where = self.info.source_path or "SAE"
        d_model, d_sae = _check_shape(where, "W_enc", W_enc, (None, None))
        _check_shape(where, "b_enc", b_enc, (d_sae,))
        _check_shape(where, "W_dec", W_dec, (d_sae, d_model))
        _check_shape(where, "b_dec", b_dec, (d_model,))
        if self.info.activation == "jumprelu":
            if threshold is None:
                raise LatentAuditError(f"{where}: a jumprelu SAE needs a 'threshold' tensor.")
            _check_shape(where, "threshold", threshold, (d_sae,))
        if self.info.activation == "topk" and self.info.k > d_sae:
            raise LatentAuditError(f"{where}: k={self.info.k} is larger than d_sae={d_sae}.")
        if mean_activation is not None:
            _check_shape(where, "mean_activation", mean_activation, (d_model,))
        self.W_enc = nn.Parameter(W_enc.detach().clone())
        self.b_enc = nn.Parameter(b_enc.detach().clone())
        self.W_dec = nn.Parameter(W_dec.detach().clone())
        self.b_dec = nn.Parameter(b_dec.detach().clone())
        self.register_buffer("threshold", None if threshold is None else threshold.detach().clone())
        self.register_buffer("mean_activation",
                             None if mean_activation is None else mean_activation.detach().clone())

    @property
    def d_model(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    @property
    def read_point(self) -> str:
        """The hook point the encoder reads: ``extra["input_hook"]`` for a transcoder (the MLP's
        input, mlp_in), else ``info.hook``, where the decoder writes and attribution reads."""
        return self.info.extra.get("input_hook") or self.info.hook

    # -- encode / decode -------------------------------------------------------------------
    def _normalise(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if self.info.input_norm == "none":
            return x, None, None
        # As OpenAI's sparse_autoencoder: centre, divide by (unbiased std + 1e-5); the
        # reconstruction is scaled back by the std without the epsilon.
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        return x / (std + 1e-5), mu, std

    def pre_activation(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """Encoder pre-activation: (x' - b_dec·s) @ W_enc + b_enc."""
        x = self._normalise(x.to(self.W_enc.dtype))[0]
        if self.info.subtract_b_dec:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """Apply the SAE's nonlinearity to encoder pre-activations."""
        if self.info.activation == "relu":
            return torch.relu(pre)
        if self.info.activation == "jumprelu":
            return pre * (pre > self.threshold)
        vals, idx = pre.topk(self.info.k, dim=-1)  # (..., k)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def encode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """Latent activations of hook activations ``x``."""
        return self.activate(self.pre_activation(x))

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_model"]:
        """Reconstruction from latents (in normalised space when input_norm is set)."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """Reconstruct ``x`` (undoing the input normalisation, if any)."""
        xn, mu, std = self._normalise(x.to(self.W_enc.dtype))
        pre = (xn - self.b_dec if self.info.subtract_b_dec else xn) @ self.W_enc + self.b_enc
        recon = self.decode(self.activate(pre))
        return recon if mu is None else recon * std + mu

    def decoder_directions(self, dtype: torch.dtype = torch.float32, rows=None
                           ) -> Float[Tensor, "d_sae d_model"]:
        """Decoder rows normalised to unit length (zero rows stay zero); ``rows``: only those
        latents (a list or slice), without a normalised copy of the whole decoder."""
        W = self.W_dec.detach()
        W = (W if rows is None else W[rows]).to(dtype)
        return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # -- compatibility checks --------------------------------------------------------------
    def check_fits(self, d_model: int, layer: int | None = None, model_name: str = "model") -> None:
        """Raise one clear error if this SAE cannot read ``model_name``'s layer ``layer``."""
        where = self.info.source_path or "the SAE"
        if d_model != self.d_model:
            raise ShapeMismatchError(
                f"{where} has d_model={self.d_model} but {model_name} has d_model={d_model}: "
                "use an SAE trained on this model.")
        if layer is not None and self.info.layer is not None and layer != self.info.layer:
            raise ShapeMismatchError(
                f"{where} was trained on layer {self.info.layer} but layer {layer} was "
                f"requested: pass --layer {self.info.layer} or an SAE for layer {layer}.")

    def check_hook(self, hook: str) -> None:
        """Raise one clear error unless this SAE reads hook point ``hook``."""
        if self.info.hook != hook:
            where = self.info.source_path or "the SAE"
            raw = self.info.extra.get("source_hook")
            said = f" (its config says {raw})" if raw else ""
            raise LatentAuditError(
                f"{where} reads the hook point {self.info.hook}{said} but {hook} is the hook "
                f"point requested: use an SAE trained on {hook}.")

    # -- latentaudit's own format ----------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The cfg.json content of latentaudit's own format."""
        i = self.info
        return {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION,
                "d_model": self.d_model, "d_sae": self.d_sae, "activation": i.activation,
                "k": i.k, "subtract_b_dec": i.subtract_b_dec, "input_norm": i.input_norm,
                "model": i.model, "layer": i.layer, "hook": i.hook,
                "has_mean_activation": self.mean_activation is not None, **i.extra}

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``cfg.json`` + ``sae.safetensors`` into ``folder`` (atomic writes)."""
        from latentaudit._io import save_safetensors, write_json

        folder = Path(folder)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec,
                   "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        if self.mean_activation is not None:
            tensors["mean_activation"] = self.mean_activation
        if dtype is not None:
            tensors = {k: v.detach().to(dtype) for k, v in tensors.items()}
        save_safetensors(folder / WEIGHTS_FILE, tensors, metadata={"format": FORMAT_NAME})
        write_json(folder / CONFIG_FILE, self.config_dict())
        return folder


def _check_shape(where: str, name: str, t: Tensor, shape: tuple[int | None, ...]
                 ) -> tuple[int, ...]:
    if not isinstance(t, Tensor):
        raise ShapeMismatchError(f"{where}: '{name}' is not a tensor.")
    ok = t.dim() == len(shape) and all(
        s is None or s == n for s, n in zip(shape, t.shape, strict=False))
    if not ok:
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise ShapeMismatchError(
            f"{where}: tensor '{name}' has shape {list(t.shape)}, expected {want}.")
    return tuple(t.shape)


def load_config(folder: Path) -> dict[str, Any]:
    """Read a cfg.json with a clear error on bad JSON."""
    path = folder / CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LatentAuditError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}.") from err
