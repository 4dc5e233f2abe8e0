"""Load sparse autoencoders saved by other libraries into the canonical :class:`SAE`.

Every format is converted once, at load time, into the layout of :mod:`latentaudit.saes.sae`
(``W_enc`` [d_model, d_sae], ``W_dec`` [d_sae, d_model]). Each tensor's shape is checked under
its name in the source file, so an error names the file and the tensor.

Formats (``format="auto"`` detects them from the files), one module each:

1. ``latentaudit`` (:mod:`.native`): ``cfg.json`` with ``"format": "latentaudit"`` +
   ``sae.safetensors``, written by :meth:`SAE.save`; the only format that stores ā.
2. ``saelens`` (:mod:`.saelens`): ``cfg.json`` + ``sae_weights.safetensors``.
3. ``sparsify`` (:mod:`.sparsify`, EleutherAI): ``cfg.json`` + ``sae.safetensors``, or a
   checkpoint folder of hookpoint folders (``layers.12/``); choose one with ``hookpoint`` or
   ``layer``.
4. ``gemma_scope`` (:mod:`.gemma_scope`): ``params.npz`` or ``params.safetensors``.
5. ``openai`` (:mod:`.openai`, openai/sparse_autoencoder): a ``.pt`` state dict.
6. ``llama_scope`` (:mod:`.llama_scope`, OpenMOSS Llama Scope): ``hyperparams.json`` +
   ``checkpoints/final.safetensors``; the dataset-wise input and output norms are folded in.

``path`` may also be a public name (:mod:`latentaudit.saes.hub`): ``org/repo/sub/folder``,
``org/repo:hookpoint`` or ``saelens:RELEASE/ID``, fetched into the hub cache first; an SAE read
from a hub cache records its repo, revision and file digests in ``SAEInfo.hub``.

JumpReLU thresholds from SAELens and Gemma Scope are clamped at 0: both apply a ReLU before the
threshold mask, and ``relu(p)·[p > θ] = p·[p > max(θ, 0)]``, the canonical rule.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from latentaudit.errors import LatentAuditError, ShapeMismatchError
from latentaudit.saes import hub, releases
from latentaudit.saes.formats import gemma_scope, llama_scope, native, openai, saelens, sparsify
from latentaudit.saes.formats._read import parse_hook, read_cfg
from latentaudit.saes.sae import CONFIG_FILE, FORMAT_NAME, SAE, WEIGHTS_FILE

log = logging.getLogger(__name__)

SAELENS_WEIGHTS = saelens.WEIGHTS
GEMMA_SCOPE_FILES = gemma_scope.FILES
FORMATS = {
    "latentaudit": 'cfg.json with "format": "latentaudit" + sae.safetensors',
    "saelens": "cfg.json + sae_weights.safetensors",
    "sparsify": "cfg.json + sae.safetensors, or a folder of hookpoint folders such as layers.12/",
    "gemma_scope": "params.npz or params.safetensors (W_enc, W_dec, b_enc, b_dec, threshold)",
    "openai": "a .pt state dict (encoder.weight, decoder.weight, pre_bias, latent_bias)",
    "llama_scope": "hyperparams.json + checkpoints/final.safetensors",
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_LOADERS = {"latentaudit": native.load, "saelens": saelens.load, "sparsify": sparsify.load,
            "gemma_scope": gemma_scope.load, "openai": openai.load,
            "llama_scope": llama_scope.load}


def load_sae(path: str | Path, format: str = "auto", device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None, hookpoint: str | None = None,
             layer: int | None = None, revision: str | None = None,
             hook: str | None = None) -> SAE:
    """Load an SAE from any supported format, or by its public name, into the canonical layout.

    ``format`` is one of :data:`FORMATS` or ``"auto"``; ``dtype`` defaults to the file's;
    ``hookpoint`` picks a subfolder of a multi-hookpoint checkpoint folder and ``layer`` picks
    the ``layers.<layer>`` one, or fills in the layer when the format does not record it;
    ``revision`` pins a hub name's branch, tag or commit; ``hook`` (e.g. ``resid_post``) is the
    hook point the SAE must read.
    """
    if format != "auto" and format not in FORMATS:
        raise LatentAuditError(f"SAE format '{format}' is not one of auto, {', '.join(FORMATS)}.")
    ref = hub.parse(path, revision)
    local = hub.fetch(ref) if ref is not None else Path(path).expanduser()
    target = _resolve(local, hookpoint, layer)
    fmt = detect_format(target) if format == "auto" else format
    sae = _LOADERS[fmt](target)
    _record_origin(sae, target, ref)
    if layer is not None and sae.info.layer is None:
        sae.info.layer = layer
    elif layer is not None and sae.info.layer != layer:
        raise ShapeMismatchError(
            f"{sae.info.source_path} was trained on layer {sae.info.layer} but layer {layer} "
            f"was requested: pass --layer {sae.info.layer} or an SAE for layer {layer}.")
    if hook is not None:
        sae.check_hook(hook)
    sae.to(_dtype(dtype) or sae.W_dec.dtype)
    if device is not None:
        sae.to(device)
    log.info("loaded %s SAE from %s: d_model=%d, d_sae=%d, %s", fmt, sae.info.source_path,
             sae.d_model, sae.d_sae, sae.info.activation)
    return sae


def _record_origin(sae: SAE, target: Path, ref: hub.HubName | None) -> None:
    """Hub origin (repo, revision, digests), Neuronpedia id, and the release's hook name for a
    format that records none."""
    files = [target] if target.is_file() else sorted(p for p in target.iterdir() if p.is_file())
    sae.info.hub = hub.origin(target, files)
    if sae.info.hub is not None:
        if ref is not None:
            sae.info.hub["name"] = ref.name
        repo, path = sae.info.hub["repo"], sae.info.hub["path"]
        np_id = ((ref.neuronpedia_id if ref is not None else None)
                 or releases.neuronpedia_for(repo, path)
                 or releases.neuronpedia_for(repo, path.rpartition("/")[0]))
        if np_id and not sae.info.extra.get("neuronpedia_id"):
            sae.info.extra["neuronpedia_id"] = np_id
    if ref is not None and ref.hook_name and sae.info.layer is None:
        sae.info.layer, found = parse_hook(ref.hook_name)
        sae.info.hook = found or sae.info.hook


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
            fmt = "latentaudit" if read_cfg(path).get("format") == FORMAT_NAME else "sparsify"
        elif (path / llama_scope.CONFIG).is_file():
            fmt = "llama_scope"
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
    chosen = subs if layer is None else [s for s in subs if parse_hook(s) == (layer, "resid_post")]
    if len(chosen) == 1:
        return path / chosen[0]
    which = f"none is for layer {layer}" if not chosen else "choose one with --hookpoint"
    raise LatentAuditError(
        f"{path} holds SAEs for several hookpoints ({', '.join(subs)}) and {which}.")


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise LatentAuditError(f"dtype '{value}' is not one of {', '.join(DTYPES)}.")
    return DTYPES[value]
