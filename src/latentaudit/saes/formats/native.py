"""The ``latentaudit`` format: ``cfg.json`` with ``"format": "latentaudit"`` + ``sae.safetensors``.

Written by :meth:`~latentaudit.saes.sae.SAE.save`; tensors are already in the canonical layout,
and it is the only format that stores ā (``mean_activation``).
"""

from __future__ import annotations

from pathlib import Path

from latentaudit.errors import LatentAuditError
from latentaudit.saes.formats._read import cfg_int, read_cfg, read_tensors, take
from latentaudit.saes.sae import (
    CONFIG_FILE,
    FORMAT_NAME,
    SAE,
    SCHEMA_VERSION,
    WEIGHTS_FILE,
    SAEInfo,
)

_OWN_KEYS = {"format", "schema_version", "d_model", "d_sae", "activation", "k", "subtract_b_dec",
             "input_norm", "model", "layer", "hook", "has_mean_activation"}


def load(folder: Path) -> SAE:
    """Read a folder written by :meth:`SAE.save`."""
    cfg_file, wfile = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    cfg = read_cfg(folder)
    version = cfg.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise LatentAuditError(f"{cfg_file}: schema_version {version!r} is newer than this "
                               f"latentaudit reads ({SCHEMA_VERSION}): upgrade latentaudit.")
    d, s = cfg_int(cfg_file, cfg, "d_model"), cfg_int(cfg_file, cfg, "d_sae")
    t = read_tensors(wfile)
    src = f"{CONFIG_FILE} d_model={d}, d_sae={s}"
    W_enc, b_enc, W_dec, b_dec = take(wfile, t, {"W_enc": (d, s), "b_enc": (s,),
                                                  "W_dec": (s, d), "b_dec": (d,)}, src)
    threshold = (take(wfile, t, {"threshold": (s,)})[0]
                 if cfg.get("activation") == "jumprelu" else None)
    mean = (take(wfile, t, {"mean_activation": (d,)})[0]
            if cfg.get("has_mean_activation") or "mean_activation" in t else None)
    try:
        info = SAEInfo(activation=cfg.get("activation", "relu"), k=cfg.get("k"),
                       subtract_b_dec=bool(cfg.get("subtract_b_dec", True)),
                       input_norm=cfg.get("input_norm", "none"), model=cfg.get("model"),
                       layer=cfg.get("layer"), hook=cfg.get("hook", "resid_post"),
                       source_format=FORMAT_NAME, source_path=str(wfile),
                       extra={k: v for k, v in cfg.items() if k not in _OWN_KEYS})
    except LatentAuditError as err:
        raise LatentAuditError(f"{cfg_file}: {err}") from None
    return SAE(W_enc, b_enc, W_dec, b_dec, info=info, threshold=threshold, mean_activation=mean)
