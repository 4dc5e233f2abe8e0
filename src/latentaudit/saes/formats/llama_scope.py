"""Llama Scope (OpenMOSS ``lm_saes``): ``hyperparams.json`` + ``checkpoints/final.safetensors``.

Tensors ``encoder.weight`` [d_sae, d_model], ``encoder.bias`` [d_sae], ``decoder.weight``
[d_model, d_sae], ``decoder.bias`` [d_model]. With s_in = √d_model / n_in and s_out =
√d_model / n_out (``dataset_average_activation_norm`` of the input and output hook points under
``norm_activation`` "dataset-wise"; 1 under "inference"), the format computes

    p = (s_in·x) @ encoder.weightᵀ + encoder.bias,   m_i = [p_i·c_i > θ] (jumprelu, scalar θ
    ``jump_relu_threshold``; c_i = ‖decoder column i‖ with ``sparsity_include_decoder_norm``,
    else 1), f = p ⊙ m,   x̂ = (f @ decoder.weightᵀ + decoder.bias) / s_out.

Conversion (same latents, same reconstruction): the canonical latent is f_i·c_i, so
``W_enc = s_in·encoder.weightᵀ·diag(c)``, ``b_enc = c ⊙ encoder.bias``, ``W_dec =
diag(1/c)·decoder.weightᵀ / s_out``, ``b_dec = decoder.bias / s_out``, threshold θ for every
latent; relu and topk (``top_k``, ranked on p_i·c_i as the format does) convert the same way.
Layer and hook point come from ``hook_point_out`` (``blocks.L.hook_resid_post``, ``hook_attn_out``,
``hook_mlp_out``); a transcoder (``hook_point_in`` differs) records its input point as
``extra["input_hook"]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from latentaudit.errors import LatentAuditError
from latentaudit.saes.formats._read import cfg_int, extra, parse_hook, read_tensors, take
from latentaudit.saes.sae import SAE, SAEInfo

CONFIG = "hyperparams.json"
WEIGHTS = ("checkpoints/final.safetensors", "checkpoints/pruned.safetensors",
           "sae_weights.safetensors")
ACTIVATIONS = {"jumprelu": "jumprelu", "relu": "relu", "topk": "topk"}


def read_hyperparams(folder: Path) -> dict[str, Any]:
    import json

    file = folder / CONFIG
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LatentAuditError(f"{file} is not readable JSON ({err}): re-download it.") from None
    if not isinstance(cfg, dict):
        raise LatentAuditError(f"{file}: expected a JSON object, got {type(cfg).__name__}.")
    return cfg


def _scales(file: Path, cfg: dict[str, Any], d: int) -> tuple[float, float]:
    """(s_in, s_out) of the module docstring."""
    mode = cfg.get("norm_activation", "dataset-wise")
    if mode == "inference":
        return 1.0, 1.0
    if mode != "dataset-wise":
        raise LatentAuditError(f"{file}: norm_activation '{mode}' is not supported (dataset-wise "
                               "and inference are): it does not fold into the weights.")
    norms = cfg.get("dataset_average_activation_norm") or {}
    found = []
    for side in ("in", "out"):
        value = norms.get(side, norms.get(cfg.get(f"hook_point_{side}")))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise LatentAuditError(
                f"{file}: field 'dataset_average_activation_norm' needs a positive '{side}' "
                f"value (got {value!r}).")
        found.append(math.sqrt(d) / value)
    return found[0], found[1]


def _kind(file: Path, cfg: dict[str, Any]) -> tuple[str, int | None, float | None]:
    """(activation, k, θ)."""
    act = cfg.get("act_fn", "relu")
    if act not in ACTIVATIONS:
        raise LatentAuditError(f"{file}: act_fn '{act}' is not supported ("
                               f"{', '.join(ACTIVATIONS)} are).")
    if cfg.get("apply_decoder_bias_to_pre_encoder") or cfg.get("use_glu_encoder"):
        flag = ("apply_decoder_bias_to_pre_encoder"
                if cfg.get("apply_decoder_bias_to_pre_encoder") else "use_glu_encoder")
        raise LatentAuditError(f"{file}: '{flag}' is not supported.")
    if act == "topk":
        return "topk", cfg_int(file, cfg, "top_k"), None
    theta = cfg.get("jump_relu_threshold", 0.0) if act == "jumprelu" else None
    if act == "jumprelu" and (not isinstance(theta, (int, float)) or isinstance(theta, bool)):
        raise LatentAuditError(f"{file}: field 'jump_relu_threshold' must be a number, got "
                               f"{theta!r}.")
    return act, None, theta


def _weights_file(folder: Path) -> Path:
    for name in WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise LatentAuditError(f"{folder} has no weights file ({', '.join(WEIGHTS)}): the Llama "
                           "Scope folder is incomplete.")


def load(folder: Path) -> SAE:
    """Read a Llama Scope folder (see the module docstring)."""
    file = folder / CONFIG
    cfg = read_hyperparams(folder)
    d, s = cfg_int(file, cfg, "d_model"), cfg_int(file, cfg, "d_sae")
    activation, k, theta = _kind(file, cfg)
    s_in, s_out = _scales(file, cfg, d)
    wfile = _weights_file(folder)
    enc_w, enc_b, dec_w, dec_b = take(
        wfile, read_tensors(wfile), {"encoder.weight": (s, d), "encoder.bias": (s,),
                                     "decoder.weight": (d, s), "decoder.bias": (d,)},
        f"{CONFIG} d_model={d}, d_sae={s}")
    c = torch.ones(s, dtype=dec_w.dtype)
    if cfg.get("sparsity_include_decoder_norm", True):
        c = dec_w.norm(dim=0)  # (S,)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    W_enc = s_in * enc_w.T * c  # (D, S)
    W_dec = torch.where(c[:, None] > 0, dec_w.T / safe[:, None], torch.zeros_like(dec_w.T)) / s_out
    threshold = torch.full((s,), float(theta)) if activation == "jumprelu" else None
    out_name, in_name = cfg.get("hook_point_out"), cfg.get("hook_point_in")
    layer, hook = parse_hook(out_name or in_name or "")
    in_point = parse_hook(in_name)[1] if in_name and in_name != out_name else None
    info = SAEInfo(activation=activation, k=k, subtract_b_dec=False, model=cfg.get("model_name"),
                   layer=layer, hook=hook or "resid_post", source_format="llama_scope",
                   source_path=str(wfile),
                   extra=extra(source_hook=out_name or in_name, input_hook=in_point,
                               transcoder=True if in_point else None))
    return SAE(W_enc, c * enc_b, W_dec, dec_b / s_out, info=info, threshold=threshold)
