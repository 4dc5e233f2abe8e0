"""Load sparse autoencoders saved by other libraries into the canonical :class:`SAE`.

Every format is converted once, at load time, into the layout of :mod:`latentaudit.saes.sae`
(``W_enc`` [d_model, d_sae], ``W_dec`` [d_sae, d_model]). Each tensor's shape is checked under
its name in the source file, so an error names the file and the tensor.

Formats (``format="auto"`` detects them from the files):

1. ``latentaudit``: ``cfg.json`` with ``"format": "latentaudit"`` + ``sae.safetensors``, written
   by :meth:`SAE.save`; the only format that stores ā (``mean_activation``).
2. ``saelens`` (SAELens ``save_model``): ``cfg.json`` + ``sae_weights.safetensors`` with
   ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``, ``b_dec`` and ``threshold``
   (jumprelu): ``f = act((x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc)``. Model and hook
   names are top-level cfg keys before SAELens 6 and sit in ``metadata`` (or ``meta``) after.
   A fine-tuning ``scaling_factor`` s is folded as ``W_dec ← diag(s)·W_dec``;
   ``rescale_acts_by_decoder_norm`` with decoder row norms n as ``W_enc ← W_enc·diag(n)``,
   ``b_enc ← b_enc⊙n``, ``W_dec ← diag(1/n)·W_dec`` (same latents, same reconstruction).
3. ``sparsify`` (EleutherAI): ``cfg.json`` (``d_in``, ``num_latents`` or ``expansion_factor``,
   ``k``) + ``sae.safetensors`` with ``encoder.weight`` [d_sae, d_in] (``W_enc`` is its
   transpose), ``encoder.bias``, ``W_dec`` [d_sae, d_in], ``b_dec``:
   ``f = topk(relu((x - b_dec) @ encoder.weightᵀ + encoder.bias))``. A checkpoint folder holds
   one such folder per hookpoint (``layers.12/``); choose one with ``hookpoint`` or ``layer``.
4. ``gemma_scope``: ``params.npz`` (or a ``.safetensors``) with ``W_enc`` [d_model, d_sae],
   ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``: ``f = relu(p)·[p > θ]`` with
   ``p = x @ W_enc + b_enc`` (no b_dec subtraction). Layer and model come from the folder
   names of the release (``gemma-scope-2b-pt-res/layer_12/...``).
5. ``openai`` (openai/sparse_autoencoder ``Autoencoder.state_dict()``): a ``.pt`` file with
   ``encoder.weight`` [n_latents, n_inputs], ``decoder.weight`` [n_inputs, n_latents] (or
   ``decoder.linear.weight`` when tied), ``pre_bias``, ``latent_bias``, ``activation``
   ("ReLU" | "TopK") and ``activation_state_dict`` (``k``, ``postact_fn``); the training
   statistics buffers are ignored. As in that library, TopK autoencoders layer-normalise each
   input token (``input_norm="layer_norm"``).

JumpReLU thresholds from SAELens and Gemma Scope are clamped at 0: both apply a ReLU before the
threshold mask, and ``relu(p)·[p > θ] = p·[p > max(θ, 0)]``, the canonical rule.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentaudit.errors import LatentAuditError, ShapeMismatchError
from latentaudit.saes.sae import (
    CONFIG_FILE,
    FORMAT_NAME,
    SAE,
    SCHEMA_VERSION,
    WEIGHTS_FILE,
    SAEInfo,
    _check_shape,
    load_config,
)

log = logging.getLogger(__name__)

SAELENS_WEIGHTS = "sae_weights.safetensors"
GEMMA_SCOPE_FILES = ("params.npz", "params.safetensors")
FORMATS = {
    "latentaudit": 'cfg.json with "format": "latentaudit" + sae.safetensors',
    "saelens": "cfg.json + sae_weights.safetensors",
    "sparsify": "cfg.json + sae.safetensors, or a folder of hookpoint folders such as layers.12/",
    "gemma_scope": "params.npz or params.safetensors (W_enc, W_dec, b_enc, b_dec, threshold)",
    "openai": "a .pt state dict (encoder.weight, decoder.weight, pre_bias, latent_bias)",
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_OWN_KEYS = {"format", "schema_version", "d_model", "d_sae", "activation", "k", "subtract_b_dec",
             "input_norm", "model", "layer", "hook", "has_mean_activation"}
_TL_HOOK = re.compile(r"blocks\.(\d+)\.(?:hook_)?(.+)$")
_HF_HOOK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.(.+))?$")


def load_sae(path: str | Path, format: str = "auto", device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None, hookpoint: str | None = None,
             layer: int | None = None) -> SAE:
    """Load an SAE from any supported format into the canonical layout.

    ``format`` is one of :data:`FORMATS` or ``"auto"``; ``dtype`` defaults to the file's;
    ``hookpoint`` picks a subfolder of a multi-hookpoint checkpoint folder and ``layer`` picks
    the ``layers.<layer>`` one, or fills in the layer when the format does not record it.
    """
    if format != "auto" and format not in FORMATS:
        raise LatentAuditError(f"SAE format '{format}' is not one of auto, {', '.join(FORMATS)}.")
    target = _resolve(Path(path).expanduser(), hookpoint, layer)
    fmt = detect_format(target) if format == "auto" else format
    sae = _LOADERS[fmt](target)
    if layer is not None and sae.info.layer is None:
        sae.info.layer = layer
    elif layer is not None and sae.info.layer != layer:
        raise ShapeMismatchError(
            f"{sae.info.source_path} was trained on layer {sae.info.layer} but layer {layer} "
            f"was requested: pass --layer {sae.info.layer} or an SAE for layer {layer}.")
    sae.to(_dtype(dtype) or sae.W_dec.dtype)
    if device is not None:
        sae.to(device)
    log.info("loaded %s SAE from %s: d_model=%d, d_sae=%d, %s", fmt, sae.info.source_path,
             sae.d_model, sae.d_sae, sae.info.activation)
    return sae


def detect_format(path: str | Path) -> str:
    """The name of the format an SAE folder or file is saved in (see the module docstring)."""
    path = Path(path)
    fmt = None
    if path.is_file():
        fmt = {".npz": "gemma_scope", ".safetensors": "gemma_scope", ".pt": "openai",
               ".pth": "openai"}.get(path.suffix)
    elif path.is_dir():
        has_cfg = (path / CONFIG_FILE).is_file()
        if has_cfg and (path / SAELENS_WEIGHTS).is_file():
            fmt = "saelens"
        elif has_cfg and (path / WEIGHTS_FILE).is_file():
            fmt = "latentaudit" if _read_cfg(path).get("format") == FORMAT_NAME else "sparsify"
    if fmt is None:
        expected = "; ".join(f"{name}: {files}" for name, files in FORMATS.items())
        raise LatentAuditError(f"{path} is not an SAE in a format latentaudit reads ({expected}).")
    return fmt


def _resolve(path: Path, hookpoint: str | None, layer: int | None) -> Path:
    """The folder or file to load: a weights file's folder, a folder's only weights file, or
    one hookpoint subfolder of a checkpoint folder."""
    if not path.exists():
        raise LatentAuditError(f"{path} does not exist: pass an SAE folder or weights file.")
    if path.is_file():
        return path.parent if path.name in (CONFIG_FILE, WEIGHTS_FILE, SAELENS_WEIGHTS) else path
    subs = sorted(d.name for d in path.iterdir() if d.is_dir() and (d / CONFIG_FILE).is_file())
    if hookpoint is not None:
        if not (path / hookpoint).is_dir():
            raise LatentAuditError(f"{path} has no hookpoint folder '{hookpoint}' (it has: "
                                   f"{', '.join(subs) or 'none'}): pass one of those.")
        return path / hookpoint
    if (path / CONFIG_FILE).is_file():
        return path
    files = [f for f in (*(path / n for n in GEMMA_SCOPE_FILES), *path.glob("*.pt"))
             if f.is_file()]
    if not subs:
        return files[0] if len(files) == 1 else path
    chosen = subs if layer is None else [s for s in subs if _parse_hook(s) == (layer, "resid_post")]
    if len(chosen) == 1:
        return path / chosen[0]
    which = f"none is for layer {layer}" if not chosen else "choose one with --hookpoint"
    raise LatentAuditError(
        f"{path} holds SAEs for several hookpoints ({', '.join(subs)}) and {which}.")


# -- readers with clear errors ---------------------------------------------------------------
def _read_cfg(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise LatentAuditError(f"{file} is missing: an SAE folder needs its config file.")
    try:
        cfg = load_config(folder)
    except UnicodeDecodeError as err:
        raise LatentAuditError(f"{file} is not UTF-8 text ({err.reason}): re-save it.") from err
    if not isinstance(cfg, dict):
        raise LatentAuditError(f"{file}: expected a JSON object, got {type(cfg).__name__}.")
    return cfg


def _read_tensors(file: Path) -> dict[str, Any]:
    """All tensors of a .safetensors, .npz (no pickles) or .pt (weights_only) file."""
    import pickle

    if not file.is_file():
        raise LatentAuditError(f"{file} is missing: the SAE's weights file is needed.")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        if file.suffix == ".npz":
            import numpy as np

            with np.load(file, allow_pickle=False) as data:
                return {name: torch.from_numpy(np.array(data[name])) for name in data.files}
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise LatentAuditError(
            f"{file} holds Python objects that torch.load(weights_only=True) refuses: save the "
            "autoencoder's state_dict() instead of the whole object.") from err
    except Exception as err:
        raise LatentAuditError(f"{file} is not a readable {file.suffix} weights file ({err}): "
                               "re-download or re-save it.") from err
    if not isinstance(obj, dict):
        raise LatentAuditError(f"{file} holds a {type(obj).__name__}, not a state dict: save the "
                               "autoencoder's state_dict().")
    return obj


def _take(file: Path, tensors: dict[str, Any], shapes: dict[str, tuple[int | None, ...]],
          source: str = "") -> list[Tensor]:
    """The named tensors, each present, finite and of its shape, or one error naming the file
    and the tensor (and ``source``, the config values the expected shape came from)."""
    out = []
    for name, shape in shapes.items():
        if name not in tensors:
            raise LatentAuditError(
                f"{file} has no tensor '{name}' (it has: {', '.join(sorted(tensors))}): the "
                "file is incomplete or in another format.")
        t = tensors[name]
        try:
            _check_shape(str(file), name, t, shape)
        except ShapeMismatchError as err:
            raise ShapeMismatchError(str(err).rstrip(".") + (f" from {source}." if source
                                                              else ".")) from None
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LatentAuditError(f"{file}: tensor '{name}' contains NaN or infinite values; "
                                   "the file is corrupt or its training diverged.")
        out.append(t)
    return out


def _cfg_int(file: Path, cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LatentAuditError(f"{file}: field '{key}' must be a positive integer, "
                               f"got {value!r}.")
    return value


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise LatentAuditError(f"dtype '{value}' is not one of {', '.join(DTYPES)}.")
    return DTYPES[value]


def _parse_hook(name: str) -> tuple[int | None, str | None]:
    """(layer, hook) of a TransformerLens or Hugging Face hook name; resid_pre of L is L-1's."""
    if m := _TL_HOOK.search(name):
        layer, hook = int(m[1]), m[2]
        if hook == "resid_pre":
            return (layer - 1, "resid_post") if layer > 0 else (None, "resid_pre")
        return layer, hook
    if m := _HF_HOOK.search(name):
        return int(m[1]), m[2] or "resid_post"
    return None, None


def _extra(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# -- the loaders -----------------------------------------------------------------------------
def _load_latentaudit(folder: Path) -> SAE:
    cfg_file, wfile = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    cfg = _read_cfg(folder)
    version = cfg.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise LatentAuditError(f"{cfg_file}: schema_version {version!r} is newer than this "
                               f"latentaudit reads ({SCHEMA_VERSION}): upgrade latentaudit.")
    d, s = _cfg_int(cfg_file, cfg, "d_model"), _cfg_int(cfg_file, cfg, "d_sae")
    t = _read_tensors(wfile)
    src = f"{CONFIG_FILE} d_model={d}, d_sae={s}"
    W_enc, b_enc, W_dec, b_dec = _take(wfile, t, {"W_enc": (d, s), "b_enc": (s,),
                                                  "W_dec": (s, d), "b_dec": (d,)}, src)
    threshold = (_take(wfile, t, {"threshold": (s,)})[0]
                 if cfg.get("activation") == "jumprelu" else None)
    mean = (_take(wfile, t, {"mean_activation": (d,)})[0]
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


def _saelens_kind(file: Path, cfg: dict[str, Any]) -> tuple[str, int | None, str]:
    """(activation, k, input_norm) of a SAELens config, old or new layout."""
    arch = cfg.get("architecture", "standard")
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
        return "topk", _cfg_int(file, {"k": cfg.get("k", kwargs.get("k"))}, "k"), norm
    if arch == "standard" and fn == "relu":
        return "relu", None, norm
    what = f"activation_fn '{fn}'" if arch == "standard" else f"architecture '{arch}'"
    raise LatentAuditError(
        f"{file}: SAELens {what} is not supported (standard relu, topk and jumprelu are); "
        "a batchtopk SAE loads once saved with SAELens's save_inference_model (as jumprelu).")


def _saelens_weights(wfile: Path, cfg: dict[str, Any], d: int, s: int, jumprelu: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """W_enc, b_enc, W_dec, b_dec, threshold with scaling factors folded in."""
    t, src = _read_tensors(wfile), f"{CONFIG_FILE} d_in={d}, d_sae={s}"
    W_enc, b_enc, W_dec, b_dec = _take(wfile, t, {"W_enc": (d, s), "b_enc": (s,),
                                                  "W_dec": (s, d), "b_dec": (d,)}, src)
    threshold = None
    if jumprelu and "threshold" not in t and "log_threshold" in t:  # a training checkpoint
        threshold = _take(wfile, t, {"log_threshold": (s,)}, src)[0].exp()
    elif jumprelu:
        threshold = _take(wfile, t, {"threshold": (s,)}, src)[0]
    if "scaling_factor" in t:
        W_dec = W_dec * _take(wfile, t, {"scaling_factor": (s,)}, src)[0][:, None]
    if cfg.get("rescale_acts_by_decoder_norm"):
        n = W_dec.norm(dim=1).clamp_min(1e-12)  # (S,)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    return W_enc, b_enc, W_dec, b_dec, None if threshold is None else threshold.clamp_min(0)


def _load_saelens(folder: Path) -> SAE:
    cfg_file, wfile = folder / CONFIG_FILE, folder / SAELENS_WEIGHTS
    cfg = _read_cfg(folder)
    meta = {**(cfg.get("meta") or {}), **(cfg.get("metadata") or {})}

    def get(key: str) -> Any:
        return cfg.get(key, meta.get(key))

    d_in, d_sae = _cfg_int(cfg_file, cfg, "d_in"), _cfg_int(cfg_file, cfg, "d_sae")
    activation, k, input_norm = _saelens_kind(cfg_file, cfg)
    *weights, threshold = _saelens_weights(wfile, cfg, d_in, d_sae, activation == "jumprelu")
    hook_name = get("hook_name") or get("hook_point")
    layer, hook = _parse_hook(hook_name) if hook_name else (None, None)
    if hook is None:
        layer, hook = get("hook_layer") or get("hook_point_layer"), hook_name or "resid_post"
    info = SAEInfo(activation=activation, k=k, input_norm=input_norm,
                   subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
                   model=get("model_name"), layer=layer, hook=hook, source_format="saelens",
                   source_path=str(wfile),
                   extra=_extra(source_hook=hook_name, dataset=get("dataset_path"),
                                neuronpedia_id=get("neuronpedia_id")))
    return SAE(*weights, info=info, threshold=threshold)


def _load_sparsify(folder: Path) -> SAE:
    cfg_file, wfile = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    cfg = _read_cfg(folder)
    for flag in ("transcode", "skip_connection", "embed_skip", "gram_lookup", "signed"):
        if cfg.get(flag):
            raise LatentAuditError(f"{cfg_file}: sparsify coders with '{flag}' set are not "
                                   "supported: latentaudit reads plain sparse autoencoders.")
    if cfg.get("activation", "topk") != "topk":
        raise LatentAuditError(f"{cfg_file}: sparsify activation '{cfg['activation']}' is not "
                               "supported (topk is).")
    d, k = _cfg_int(cfg_file, cfg, "d_in"), _cfg_int(cfg_file, cfg, "k")
    s = (_cfg_int(cfg_file, cfg, "num_latents") if cfg.get("num_latents")
         else d * _cfg_int(cfg_file, cfg, "expansion_factor"))
    t = _read_tensors(wfile)
    if "W_skip" in t:
        raise LatentAuditError(f"{wfile}: tensor 'W_skip' (a skip connection) is not supported.")
    enc_w, enc_b, W_dec, b_dec = _take(
        wfile, t, {"encoder.weight": (s, d), "encoder.bias": (s,), "W_dec": (s, d),
                   "b_dec": (d,)}, f"{CONFIG_FILE} d_in={d}, {s} latents")
    layer, hook = _parse_hook(folder.name)
    info = SAEInfo(activation="topk", k=k, subtract_b_dec=True, layer=layer,
                   hook=hook or "resid_post", source_format="sparsify", source_path=str(wfile),
                   extra=_extra(source_hook=folder.name if hook else None))
    return SAE(enc_w.T, enc_b, W_dec, b_dec, info=info)


def _gemma_scope_place(file: Path) -> tuple[int | None, str, str | None]:
    """(layer, hook, model) from release folder names such as gemma-scope-2b-pt-res/layer_12."""
    layer, hook, model = None, "resid_post", None
    for part in file.parts:
        if m := re.fullmatch(r"layer_(\d+)", part):
            layer = int(m[1])
        if m := re.fullmatch(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)\w*", part):
            model = f"google/gemma-2-{m[1]}" + ("-it" if m[2] == "it" else "")
            hook = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}[m[3]]
    return layer, hook, model


def _load_gemma_scope(file: Path) -> SAE:
    # releases spell the weights W_enc or w_enc
    t = {("W_" + n[2:] if n.startswith("w_") else n): v for n, v in _read_tensors(file).items()}
    d, s = _take(file, t, {"W_enc": (None, None)})[0].shape
    W_enc, b_enc, W_dec, b_dec, threshold = _take(
        file, t, {"W_enc": (d, s), "b_enc": (s,), "W_dec": (s, d), "b_dec": (d,),
                  "threshold": (s,)})
    layer, hook, model = _gemma_scope_place(file)
    info = SAEInfo(activation="jumprelu", subtract_b_dec=False, model=model, layer=layer,
                   hook=hook, source_format="gemma_scope", source_path=str(file))
    return SAE(W_enc, b_enc, W_dec, b_dec, info=info, threshold=threshold.clamp_min(0))


def _load_openai(file: Path) -> SAE:
    sd = _read_tensors(file)
    name, act_state = sd.get("activation", "ReLU"), sd.get("activation_state_dict") or {}
    if name == "TopK" and act_state.get("postact_fn", "ReLU") == "ReLU":
        activation, k, norm = "topk", _cfg_int(file, act_state, "k"), "layer_norm"
    elif name == "ReLU":
        activation, k, norm = "relu", None, "none"
    else:
        raise LatentAuditError(f"{file}: activation '{name}' ({act_state.get('postact_fn')}) "
                               "is not supported (ReLU and TopK with ReLU are).")
    enc = _take(file, sd, {"encoder.weight": (None, None)})[0]
    s, d = enc.shape
    pre_bias, latent_bias = _take(file, sd, {"pre_bias": (d,), "latent_bias": (s,)})
    if "decoder.weight" not in sd and "decoder.linear.weight" in sd:  # tied: W_dec is encoder's
        W_dec = _take(file, sd, {"decoder.linear.weight": (s, d)})[0]
    else:
        W_dec = _take(file, sd, {"decoder.weight": (d, s)})[0].T
    info = SAEInfo(activation=activation, k=k, subtract_b_dec=True, input_norm=norm,
                   source_format="openai", source_path=str(file))
    return SAE(enc.T, latent_bias, W_dec, pre_bias, info=info)


_LOADERS = {"latentaudit": _load_latentaudit, "saelens": _load_saelens,
            "sparsify": _load_sparsify, "gemma_scope": _load_gemma_scope, "openai": _load_openai}
