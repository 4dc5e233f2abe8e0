"""Gemma Scope: ``params.npz`` (or a ``.safetensors``) with ``W_enc`` [d_model, d_sae], ``W_dec``,
``b_enc``, ``b_dec``, ``threshold``.

``f = relu(p)·[p > θ]`` with ``p = x @ W_enc + b_enc`` (no b_dec subtraction); θ is clamped at
0 (see :mod:`latentaudit.saes.formats`). Layer and model come from the folder names of the
release (``gemma-scope-2b-pt-res/layer_12/...``).
"""

from __future__ import annotations

import re
from pathlib import Path

from latentaudit.saes.formats._read import read_tensors, take
from latentaudit.saes.sae import SAE, SAEInfo

FILES = ("params.npz", "params.safetensors")


def _gemma_scope_place(file: Path) -> tuple[int | None, str, str | None]:
    """(layer, hook, model) from release folder names such as gemma-scope-2b-pt-res/layer_12
    (also as a hub cache folder, models--google--gemma-scope-2b-pt-res) or Gemma Scope 2's
    gemma-scope-2-1b-pt/mlp_out_all/layer_7_width_16k_l0_medium."""
    layer, hook, model = None, "resid_post", None
    for part in file.parts:
        if m := re.fullmatch(r"layer_(\d+)(?:_width_\w+)?", part):
            layer = int(m[1])
        if m := re.fullmatch(r"(?:models--google--)?gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)\w*",
                             part):
            model = f"google/gemma-2-{m[1]}" + ("-it" if m[2] == "it" else "")
            hook = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}[m[3]]
        if m := re.fullmatch(r"(?:models--google--)?gemma-scope-2-(\w+)-(pt|it)", part):
            model = f"google/gemma-3-{m[1]}-{m[2]}"
        if m := re.fullmatch(r"(resid_post|mlp_out|attn_out)(?:_all)?", part):
            hook = m[1]
    return layer, hook, model


def load(file: Path) -> SAE:
    """Read a Gemma Scope parameters file (see the module docstring)."""
    # releases spell the weights W_enc or w_enc
    t = {("W_" + n[2:] if n.startswith("w_") else n): v for n, v in read_tensors(file).items()}
    d, s = take(file, t, {"W_enc": (None, None)})[0].shape
    W_enc, b_enc, W_dec, b_dec, threshold = take(
        file, t, {"W_enc": (d, s), "b_enc": (s,), "W_dec": (s, d), "b_dec": (d,),
                  "threshold": (s,)})
    layer, hook, model = _gemma_scope_place(file)
    info = SAEInfo(activation="jumprelu", subtract_b_dec=False, model=model, layer=layer,
                   hook=hook, source_format="gemma_scope", source_path=str(file))
    return SAE(W_enc, b_enc, W_dec, b_dec, info=info, threshold=threshold.clamp_min(0))
