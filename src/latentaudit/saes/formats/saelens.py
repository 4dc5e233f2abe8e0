"""SAELens (``save_model``): ``cfg.json`` + ``sae_weights.safetensors``.

Tensors ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``, ``b_dec`` and ``threshold``
(jumprelu): ``f = act((x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc)``. Model and hook names
are top-level cfg keys before SAELens 6 and sit in ``metadata`` (or ``meta``) after. A
fine-tuning ``scaling_factor`` s is folded as ``W_dec ← diag(s)·W_dec``;
``rescale_acts_by_decoder_norm`` with decoder row norms n as ``W_enc ← W_enc·diag(n)``,
``b_enc ← b_enc⊙n``, ``W_dec ← diag(1/n)·W_dec`` (same latents, same reconstruction).
JumpReLU thresholds are clamped at 0 (see :mod:`latentaudit.saes.formats`).

Transcoders (``architecture`` transcoder or jumprelu_transcoder) read ``hook_name`` (the MLP's
input: ``blocks.L.ln2.hook_normalized`` or ``blocks.L.hook_mlp_in``) and write ``hook_name_out``
(``blocks.L.hook_mlp_out``); their ``b_dec`` [d_out] lives on the output side, so the encoder
subtracts nothing. The SAE's hook point is the output one (attribution reads the decoder rows
there) and ``extra["input_hook"]`` the one its encoder reads. ``d_out`` must equal ``d_in``; a
skip_transcoder (``W_skip``) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from latentaudit.errors import LatentAuditError
from latentaudit.saes.formats._read import (
    cfg_int,
    extra,
    parse_hook,
    read_cfg,
    read_tensors,
    take,
)
from latentaudit.saes.sae import CONFIG_FILE, SAE, SAEInfo

WEIGHTS = "sae_weights.safetensors"
TRANSCODERS = {"transcoder": "standard", "jumprelu_transcoder": "jumprelu"}
"""SAELens transcoder architectures and the SAE architecture of their encoder."""


def _saelens_kind(file: Path, cfg: dict[str, Any]) -> tuple[str, int | None, str]:
    """(activation, k, input_norm) of a SAELens config, old or new layout."""
    arch = TRANSCODERS.get(cfg.get("architecture", "standard"), cfg.get("architecture",
                                                                        "standard"))
    fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    norm = cfg.get("normalize_activations")
    if norm not in (None, False, "none", "layer_norm"):
        raise LatentAuditError(
            f"{file}: normalize_activations={norm!r} is not supported (none and layer_norm "
            "are); fold the scaling factor into the weights with SAELens's "
            "fold_activation_norm_scaling_factor and save again.")
    norm = "layer_norm" if norm == "layer_norm" else "none"
    if arch == "jumprelu":
        return "jumprelu", None, norm
    if arch == "topk" or (arch == "standard" and fn == "topk"):
        kwargs = cfg.get("activation_fn_kwargs") or {}
        return "topk", cfg_int(file, {"k": cfg.get("k", kwargs.get("k"))}, "k"), norm
    if arch == "standard" and fn == "relu":
        return "relu", None, norm
    what = f"activation_fn '{fn}'" if arch == "standard" else f"architecture '{arch}'"
    raise LatentAuditError(
        f"{file}: SAELens {what} is not supported (standard relu, topk and jumprelu are); "
        "a batchtopk SAE loads once saved with SAELens's save_inference_model (as jumprelu).")


def _saelens_weights(wfile: Path, cfg: dict[str, Any], d: int, s: int, jumprelu: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """W_enc, b_enc, W_dec, b_dec, threshold with scaling factors folded in."""
    t, src = read_tensors(wfile), f"{CONFIG_FILE} d_in={d}, d_sae={s}"
    W_enc, b_enc, W_dec, b_dec = take(wfile, t, {"W_enc": (d, s), "b_enc": (s,),
                                                  "W_dec": (s, d), "b_dec": (d,)}, src)
    threshold = None
    if jumprelu and "threshold" not in t and "log_threshold" in t:  # a training checkpoint
        threshold = take(wfile, t, {"log_threshold": (s,)}, src)[0].exp()
    elif jumprelu:
        threshold = take(wfile, t, {"threshold": (s,)}, src)[0]
    if "scaling_factor" in t:
        W_dec = W_dec * take(wfile, t, {"scaling_factor": (s,)}, src)[0][:, None]
    if cfg.get("rescale_acts_by_decoder_norm"):
        n = W_dec.norm(dim=1).clamp_min(1e-12)  # (S,)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    return W_enc, b_enc, W_dec, b_dec, None if threshold is None else threshold.clamp_min(0)


def load(folder: Path) -> SAE:
    """Read a SAELens folder (see the module docstring)."""
    cfg_file, wfile = folder / CONFIG_FILE, folder / WEIGHTS
    cfg = read_cfg(folder)
    meta = {**(cfg.get("meta") or {}), **(cfg.get("metadata") or {})}

    def get(key: str) -> Any:
        return cfg.get(key, meta.get(key))

    d_in, d_sae = cfg_int(cfg_file, cfg, "d_in"), cfg_int(cfg_file, cfg, "d_sae")
    activation, k, input_norm = _saelens_kind(cfg_file, cfg)
    transcoder = _check_transcoder(cfg_file, cfg, d_in)
    *weights, threshold = _saelens_weights(wfile, cfg, d_in, d_sae, activation == "jumprelu")
    hook_name = get("hook_name") or get("hook_point")
    layer, hook = parse_hook(hook_name) if hook_name else (None, None)
    if hook is None:
        layer, hook = get("hook_layer") or get("hook_point_layer"), hook_name or "resid_post"
    input_hook = None
    if transcoder:
        input_hook = hook
        out_name = get("hook_name_out")
        if not out_name:
            raise LatentAuditError(f"{cfg_file}: a transcoder needs 'hook_name_out' (where its "
                                   "decoder writes, e.g. blocks.L.hook_mlp_out).")
        layer, hook = parse_hook(out_name)
        hook = hook or out_name
    info = SAEInfo(activation=activation, k=k, input_norm=input_norm,
                   subtract_b_dec=not transcoder and bool(cfg.get("apply_b_dec_to_input", True)),
                   model=get("model_name"), layer=layer, hook=hook, source_format="saelens",
                   source_path=str(wfile),
                   extra=extra(source_hook=hook_name, dataset=get("dataset_path"),
                                neuronpedia_id=get("neuronpedia_id"), input_hook=input_hook,
                                transcoder=True if transcoder else None))
    return SAE(*weights, info=info, threshold=threshold)


def _check_transcoder(file: Path, cfg: dict[str, Any], d_in: int) -> bool:
    """Whether the config is a transcoder latentaudit reads (see the module docstring)."""
    arch = cfg.get("architecture")
    if arch == "skip_transcoder":
        raise LatentAuditError(f"{file}: a skip_transcoder (W_skip) is not supported: "
                               "latentaudit reads transcoders without a skip connection.")
    if arch not in TRANSCODERS:
        return False
    if cfg_int(file, cfg, "d_out") != d_in:
        raise LatentAuditError(f"{file}: field 'd_out' is {cfg['d_out']} but 'd_in' is {d_in}: "
                               "latentaudit reads transcoders between points of one width.")
    return True
