"""Train a TopK sparse autoencoder on harvested activations (Gao et al. 2024, "Scaling and
evaluating sparse autoencoders", arXiv:2406.04093).

Model: ``f = relu(topk_k((x - b_dec) @ W_enc + b_enc))``, ``x̂ = f @ W_dec + b_dec``.

1. Initialise: ``b_dec`` = mean (or geometric median) of the first ``init_rows`` rows; ``W_dec``
   rows random unit vectors; ``W_enc = W_dec^T``; ``b_enc = 0``. With ``normalize`` the rows are
   multiplied by ``s = sqrt(d_model / E||x||²)`` during training (so one learning rate fits every
   model's activation scale); the exported SAE folds ``s`` back in (``b_dec /= s``,
   ``b_enc /= s``: TopK and ReLU are positively homogeneous), so it reads raw activations.
2. Loss per batch, normalised by the batch's total variance ``V = Σ||x - mean(x)||²``:
   ``L = Σ||x - x̂||² / V + auxk_coef · Σ||e - ê||² / V`` where ``e = x - x̂`` (held fixed) and
   ``ê`` is decoded (without ``b_dec``) from the ``k_aux`` largest pre-activations among *dead*
   latents (not active in the last ``dead_tokens`` tokens): AuxK gives dead latents a gradient.
3. Step: remove from each decoder row's gradient its component along the row, Adam (lr with
   linear warm-up over ``warmup_frac`` of the steps and linear decay to 0 over the last
   ``decay_frac``), then renormalise the decoder rows to unit length.
4. Checkpoints (atomic: weights file first, then ``checkpoint.json`` naming it) hold the SAE,
   Adam's state, the dead-latent counters, the RNG state, the step and so the data position
   (``step · batch_size`` rows into :func:`~latentaudit.saes.harvest.iter_batches`'s stream):
   a resumed run reproduces the uninterrupted one.

The learning rate defaults to Gao et al.'s scaling ``2e-4 / sqrt(d_sae / 2^14)``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from latentaudit._io import save_safetensors, write_json
from latentaudit._progress import progress
from latentaudit.errors import LatentAuditError
from latentaudit.options import OptionError
from latentaudit.saes.harvest import ChunkSource, iter_batches
from latentaudit.saes.sae import SAE, SAEInfo

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
SCHEMA_VERSION = 1
B_DEC_INITS = ("mean", "geometric_median", "zero")


@dataclass
class TrainConfig:
    """Hyper-parameters of TopK SAE training (see the module docstring)."""

    d_sae: int
    """Number of latents."""
    k: int
    """Active latents per token."""
    tokens: int
    """Training tokens; steps = tokens // batch_size."""
    batch_size: int = 4096
    """Activation rows per step."""
    lr: float | None = None
    """Adam learning rate; None: 2e-4 / sqrt(d_sae / 2^14)."""
    warmup_frac: float = 0.01
    """Fraction of the steps with a linear learning-rate warm-up."""
    decay_frac: float = 0.2
    """Fraction of the steps at the end with a linear decay to 0."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 6.25e-10
    """Adam epsilon."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value (None: no clipping)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (0 disables it)."""
    k_aux: int | None = None
    """Dead latents used by AuxK; None: d_model // 2."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without activating; None: min(10M, tokens/10)."""
    b_dec_init: str = "mean"
    """Initial b_dec: mean, geometric_median or zero."""
    init_rows: int = 16384
    """Rows used to initialise b_dec and the input scale."""
    normalize: bool = True
    """Scale inputs to E||x||² = d_model while training (folded back on export)."""
    seed: int = 0
    """Seed of the initialisation and of the data order."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (0: only at the end)."""
    log_every: int = 50
    """Steps between recorded metrics."""

    def __post_init__(self) -> None:
        if self.d_sae < 1 or not 1 <= self.k <= self.d_sae:
            raise OptionError("k", f"{{}} {self.k} must be between 1 and {{d_sae}} {self.d_sae}.")
        if self.tokens < self.batch_size or self.batch_size < 2:
            raise OptionError(
                "tokens", f"{{}} {self.tokens} must be at least {{batch_size}} {self.batch_size} "
                          "(>= 2).")
        if self.lr is not None and self.lr <= 0:
            raise OptionError("lr", f"{{}} {self.lr} must be positive.")
        if not (0 <= self.warmup_frac < 1 and 0 <= self.decay_frac <= 1
                and self.warmup_frac + self.decay_frac <= 1):
            raise LatentAuditError("warmup_frac and decay_frac must lie in [0, 1] and sum to <= 1.")
        if self.b_dec_init not in B_DEC_INITS:
            raise LatentAuditError(
                f"b_dec_init '{self.b_dec_init}' is not one of {', '.join(B_DEC_INITS)}.")
        if self.auxk_coef < 0 or (self.k_aux is not None and self.k_aux < 1):
            raise LatentAuditError("auxk_coef must be >= 0 and k_aux positive.")
        if self.dead_tokens is not None and self.dead_tokens < 1:
            raise LatentAuditError("dead_tokens must be positive.")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 2**14)

    @property
    def dead_window(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(min(10_000_000, self.tokens // 10), self.batch_size)


class StepStats(NamedTuple):
    """Metrics of one training step."""

    fvu: float
    """Σ||x - x̂||² / Σ||x - mean(x)||² on the batch."""
    auxk: float
    """The normalised AuxK loss (0 when no latent is dead)."""
    l0: float
    """Mean number of active latents per token."""
    dead: float
    """Fraction of latents inactive over the last dead_window tokens."""


# -- pure pieces ----------------------------------------------------------------------------
def lr_at(step: int, steps: int, base: float, warmup_frac: float, decay_frac: float) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, constant, linear decay to 0."""
    warm = max(1, round(steps * warmup_frac))
    decay_start = steps - round(steps * decay_frac)
    factor = min(1.0, (step + 1) / warm)
    if step >= decay_start:
        factor = min(factor, (steps - step) / max(1, steps - decay_start))
    return base * factor


def geometric_median(x: Float[Tensor, "rows d_model"], iters: int = 100, tol: float = 1e-6
                     ) -> Float[Tensor, " d_model"]:
    """The point minimising Σ||x_i - m|| (Weiszfeld's iterations from the mean)."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-12)  # (N,)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * m.norm().clamp_min(1e-12):
            m = new
            break
        m = new
    return m.float()


def topk_encode(sae: SAE, x: Float[Tensor, "batch d_model"], k: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Pre-activations (B, S), and the top-k indices (B, k) and relu'd values (B, k)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (B, S)
    vals, idx = pre.topk(k, dim=-1)  # (B, k)
    return pre, idx, torch.relu(vals)


def sparse_decode(W_dec: Float[Tensor, "d_sae d_model"], idx: Tensor, vals: Tensor
                  ) -> Float[Tensor, "batch d_model"]:
    """Σ_j vals[:, j] · W_dec[idx[:, j]] without materialising the dense code."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


@torch.no_grad()
def project_decoder_grad(W_dec: Tensor) -> None:
    """Remove from each decoder row's gradient its component along the (unit) row.

    Under no_grad: W_dec requires grad, so this in-place update would otherwise record an
    autograd graph on the gradient that grows with every step.
    """
    if W_dec.grad is not None:
        W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec


@torch.no_grad()
def normalise_decoder(W_dec: Tensor) -> None:
    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def init_sae(cfg: TrainConfig, sample: Float[Tensor, "rows d_model"], scale: float) -> SAE:
    """A fresh SAE for (already scaled) rows like ``sample`` (step 1 of the module docstring)."""
    d_model = sample.shape[1]
    g = torch.Generator().manual_seed(cfg.seed)
    W_dec = torch.randn(cfg.d_sae, d_model, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    if cfg.b_dec_init == "mean":
        b_dec = sample.float().mean(0)
    elif cfg.b_dec_init == "geometric_median":
        b_dec = geometric_median(sample)
    else:
        b_dec = torch.zeros(d_model)
    return SAE(W_dec.T.clone(), torch.zeros(cfg.d_sae), W_dec, b_dec,
               info=SAEInfo(activation="topk", k=cfg.k, subtract_b_dec=True))


# -- the trainer ----------------------------------------------------------------------------
@dataclass
class Trainer:
    """TopK SAE training state; :meth:`start` or :meth:`resume`, then :meth:`fit`."""

    cfg: TrainConfig
    sae: SAE
    scale: float
    """Input multiplier used while training (1 without ``normalize``)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sae = self.sae.to(self.device, torch.float32)
        self.sae.requires_grad_(True)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.cfg.base_lr,
                                    betas=self.cfg.betas, eps=self.cfg.eps)
        self.since_fired = torch.zeros(self.cfg.d_sae, dtype=torch.long, device=self.device)

    @classmethod
    def start(cls, cfg: TrainConfig, source: ChunkSource, device: str | torch.device = "cpu"
              ) -> Trainer:
        """Initialise from the first ``init_rows`` rows of the training stream."""
        sample = next(iter_batches(source, min(cfg.init_rows, sum(source.chunk_sizes)),
                                   cfg.seed)).float()  # (N, D)
        scale = 1.0
        if cfg.normalize:
            scale = math.sqrt(sample.shape[1] / sample.pow(2).sum(1).mean().clamp_min(1e-12))
        return cls(cfg, init_sae(cfg, sample * scale, scale), scale, torch.device(device))

    @property
    def k_aux(self) -> int:
        return min(self.cfg.k_aux or self.sae.d_model // 2, self.cfg.d_sae)

    def train_step(self, x: Float[Tensor, "batch d_model"]) -> StepStats:
        """One optimisation step on a batch of raw rows (steps 2-3 of the module docstring)."""
        cfg, sae = self.cfg, self.sae
        x = x.to(self.device, torch.float32) * self.scale  # (B, D)
        pre, idx, vals = topk_encode(sae, x, cfg.k)
        recon = sparse_decode(sae.W_dec, idx, vals) + sae.b_dec  # (B, D)
        variance = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        mse = (recon - x).pow(2).sum() / variance
        dead = self.since_fired >= self.cfg.dead_window  # (S,)
        auxk = torch.zeros((), device=self.device)
        n_dead = int(dead.sum())
        if cfg.auxk_coef > 0 and n_dead:
            aux_vals, aux_idx = pre.masked_fill(~dead, -torch.inf).topk(
                min(self.k_aux, n_dead), dim=-1)  # (B, k_aux)
            e_hat = sparse_decode(sae.W_dec, aux_idx, torch.relu(aux_vals))  # (B, D)
            auxk = (e_hat - (x - recon).detach()).pow(2).sum() / variance
        loss = mse + cfg.auxk_coef * auxk
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        project_decoder_grad(sae.W_dec)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg.steps, cfg.base_lr, cfg.warmup_frac,
                                cfg.decay_frac)
        self.opt.step()
        normalise_decoder(sae.W_dec)
        active = vals > 0  # (B, k)
        self.since_fired += len(x)
        self.since_fired[idx[active]] = 0
        self.step += 1
        return StepStats(float(mse.detach()), float(auxk.detach()),
                         float(active.sum(1).float().mean()), n_dead / cfg.d_sae)

    def fit(self, source: ChunkSource, *, checkpoint_dir: str | Path | None = None,
            stop_at: int | None = None, show_progress: bool = True) -> None:
        """Train up to ``cfg.steps`` (or ``stop_at``) steps, checkpointing into the folder."""
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        batches = iter_batches(source, cfg.batch_size, cfg.seed, self.step * cfg.batch_size)
        with progress(total=cfg.steps, desc="train-sae", unit="step",
                      disable=None if show_progress else True) as bar:
            bar.update(self.step)
            while self.step < end:
                stats = self.train_step(next(batches))
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.history.append({"step": self.step, **stats._asdict()})
                    bar.set_description_str(f"train-sae fvu={stats.fvu:.3f} dead={stats.dead:.2f}")
                    log.debug("step %d: %s", self.step, stats)
                if checkpoint_dir and cfg.checkpoint_every and \
                        self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_dir)
        if checkpoint_dir:
            self.save_checkpoint(checkpoint_dir)

    def dead_fraction(self) -> float:
        """Fraction of latents inactive over the last ``dead_window`` tokens."""
        return float((self.since_fired >= self.cfg.dead_window).float().mean())

    def export(self, info: SAEInfo | None = None,
               mean_activation: Float[Tensor, " d_model"] | None = None) -> SAE:
        """The trained SAE for raw activations (scale folded back), on the CPU, float32."""
        s = self.sae
        with torch.no_grad():
            out = SAE(s.W_enc.cpu(), s.b_enc.cpu() / self.scale, s.W_dec.cpu(),
                      s.b_dec.cpu() / self.scale,
                      info=info or SAEInfo(activation="topk", k=self.cfg.k),
                      mean_activation=mean_activation)
        return out.requires_grad_(False)

    # -- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, folder: str | Path) -> Path:
        """Atomically save everything a resumed run needs (step 4 of the module docstring)."""
        folder = Path(folder)
        name = f"state-{self.step:09d}.safetensors"
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items() if v is not None}
        for i, state in self.opt.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"adam.{i}.{key}"] = torch.as_tensor(value)
        tensors["since_fired"] = self.since_fired
        tensors["rng.cpu"] = torch.get_rng_state()
        save_safetensors(folder / name, tensors)
        old = _checkpoint_file(folder)
        write_json(folder / CHECKPOINT, {
            "schema_version": SCHEMA_VERSION, "step": self.step, "state": name,
            "rows_consumed": self.step * self.cfg.batch_size, "scale": self.scale,
            "d_model": self.sae.d_model, "config": asdict(self.cfg), "history": self.history})
        if old is not None and old.name != name:
            old.unlink(missing_ok=True)
        return folder / CHECKPOINT

    @classmethod
    def resume(cls, folder: str | Path, device: str | torch.device = "cpu",
               cfg: TrainConfig | None = None) -> Trainer:
        """Rebuild a trainer from a checkpoint folder (``cfg`` may extend ``tokens`` only)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = _read_checkpoint(folder)
        saved = TrainConfig(**{**meta["config"], "betas": tuple(meta["config"]["betas"])})
        if cfg is not None:
            _check_same_config(folder, saved, cfg)
            saved = cfg
        tensors = load_file(str(folder / meta["state"]))
        d_model = int(meta["d_model"])
        sae = SAE(torch.zeros(d_model, saved.d_sae), torch.zeros(saved.d_sae),
                  torch.zeros(saved.d_sae, d_model), torch.zeros(d_model),
                  info=SAEInfo(activation="topk", k=saved.k))
        sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        trainer = cls(saved, sae, float(meta["scale"]), torch.device(device), int(meta["step"]),
                      list(meta["history"]))
        opt_state = trainer.opt.state_dict()
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, i, name = key.split(".", 2)
                opt_state["state"].setdefault(int(i), {})[name] = value
        trainer.opt.load_state_dict(opt_state)
        trainer.since_fired.copy_(tensors["since_fired"])
        torch.set_rng_state(tensors["rng.cpu"])
        return trainer


def _checkpoint_file(folder: Path) -> Path | None:
    path = folder / CHECKPOINT
    if not path.exists():
        return None
    return folder / json.loads(path.read_text(encoding="utf-8"))["state"]


def _read_checkpoint(folder: Path) -> dict:
    path = folder / CHECKPOINT
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LatentAuditError(
            f"{path} does not exist: there is no checkpoint to resume.") from None
    except json.JSONDecodeError as err:
        raise LatentAuditError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}.") from err
    if meta.get("schema_version") != SCHEMA_VERSION or not (folder / meta["state"]).exists():
        raise LatentAuditError(f"{path} is not a usable checkpoint: start a fresh run.")
    return meta


def _check_same_config(folder: Path, saved: TrainConfig, new: TrainConfig) -> None:
    a, b = asdict(saved), asdict(new)
    for key in a:
        if key not in ("tokens", "checkpoint_every", "log_every") and a[key] != b[key]:
            raise LatentAuditError(
                f"{folder / CHECKPOINT}: '{key}' was {a[key]!r} but this run asks for {b[key]!r}: "
                "resume with the same settings, or start in another output folder.")
