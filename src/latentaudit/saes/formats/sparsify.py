"""EleutherAI sparsify: ``cfg.json`` (``d_in``, ``num_latents`` or ``expansion_factor``, ``k``)
+ ``sae.safetensors``.

Tensors ``encoder.weight`` [d_sae, d_in] (``W_enc`` is its transpose), ``encoder.bias``,
``W_dec`` [d_sae, d_in], ``b_dec``: ``f = topk(relu((x - b_dec) @ encoder.weightᵀ +
encoder.bias))``. A checkpoint folder holds one such folder per hookpoint (``layers.12/``); the
layer and hook are read from that folder's name.

A transcoder (``transcode``: true, hookpoint ``layers.L.mlp``) reads the MLP's input and writes
its output; its ``b_dec`` lives on the output side, so the encoder subtracts nothing. Its hook is
the output point (mlp_out) and ``extra["input_hook"]`` mlp_in. A skip connection is refused.
"""

from __future__ import annotations

from pathlib import Path

from latentaudit.errors import LatentAuditError
from latentaudit.saes.formats._read import (
    cfg_int,
    extra,
    parse_hook,
    read_cfg,
    read_tensors,
    take,
)
from latentaudit.saes.sae import CONFIG_FILE, SAE, WEIGHTS_FILE, SAEInfo


def load(folder: Path) -> SAE:
    """Read one sparsify hookpoint folder (see the module docstring)."""
    cfg_file, wfile = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    cfg = read_cfg(folder)
    for flag in ("skip_connection", "embed_skip", "gram_lookup", "signed"):
        if cfg.get(flag):
            raise LatentAuditError(f"{cfg_file}: sparsify coders with '{flag}' set are not "
                                   "supported: latentaudit reads plain sparse autoencoders.")
    if cfg.get("activation", "topk") != "topk":
        raise LatentAuditError(f"{cfg_file}: sparsify activation '{cfg['activation']}' is not "
                               "supported (topk is).")
    d, k = cfg_int(cfg_file, cfg, "d_in"), cfg_int(cfg_file, cfg, "k")
    s = (cfg_int(cfg_file, cfg, "num_latents") if cfg.get("num_latents")
         else d * cfg_int(cfg_file, cfg, "expansion_factor"))
    t = read_tensors(wfile)
    if "W_skip" in t:
        raise LatentAuditError(f"{wfile}: tensor 'W_skip' (a skip connection) is not supported.")
    enc_w, enc_b, W_dec, b_dec = take(
        wfile, t, {"encoder.weight": (s, d), "encoder.bias": (s,), "W_dec": (s, d),
                   "b_dec": (d,)}, f"{CONFIG_FILE} d_in={d}, {s} latents")
    layer, hook = parse_hook(folder.name)
    transcoder = bool(cfg.get("transcode"))
    if transcoder and hook != "mlp_out":
        raise LatentAuditError(f"{folder}: a sparsify transcoder is read at an MLP (a hookpoint "
                               f"folder such as layers.3.mlp), not at '{folder.name}'.")
    info = SAEInfo(activation="topk", k=k, subtract_b_dec=not transcoder, layer=layer,
                   hook=hook or "resid_post", source_format="sparsify", source_path=str(wfile),
                   extra=extra(source_hook=folder.name if hook else None,
                               input_hook="mlp_in" if transcoder else None,
                               transcoder=True if transcoder else None))
    return SAE(enc_w.T, enc_b, W_dec, b_dec, info=info)
