"""Plan an attribution run before the loop starts (steps 1–2 of the package docstring).

1. :func:`check_inputs` (no model needed, so it runs before one loads): read and validate the
   dataset, pair its completions and weigh them, load the SAE files and decide each one's layer
   by the one layer rule, :func:`saes_by_layer`.
2. :func:`make_plan` (needs only the tokenizer): token ids of every paired completion, and
   batches of completions sorted by length. The plan is deterministic, so a checkpoint that
   counts finished batches can resume it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from latentaudit.attribution.config import AttributionConfig
from latentaudit.data.behaviour import Completion, Pairing, dataset_hash, load_pairs
from latentaudit.data.tokens import completion_ids, prompt_ids
from latentaudit.errors import LatentAuditError
from latentaudit.models.forward import pad_id
from latentaudit.options import Naming, OptionError, flag
from latentaudit.saes.sae import CONFIG_FILE, SAE

SAESource = SAE | str | os.PathLike
"""An SAE, or a path to one in any supported format."""
SAEs = SAESource | Sequence[SAESource] | Mapping[int, SAESource]
"""One SAE, several (each at the layer it records, or at ``layers``), or {layer: SAE}."""
Data = str | os.PathLike | Sequence[Completion]
HOOK = "resid_post"
"""The hook point the stages that replay the layers above one (explain's exact check, circuits,
steering's log-odds, monitors) read SAEs at: the output of its decoder layer."""
POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
"""Hook points attribution reads (see :func:`latentaudit.models.hooks.hook_site`)."""
"""A behaviour dataset: a JSONL path, or completions built in code."""


@dataclass
class Inputs:
    """Everything attribution needs that does not depend on the model."""

    data: list[Completion]
    pairing: Pairing
    saes: dict[int, SAE]
    """The SAE read at each layer, in layer order."""
    dataset: dict[str, str] | None
    """``path`` and ``sha256`` of the dataset file (None for completions given in code)."""


def check_inputs(saes: SAEs, data: Data, layers: int | Sequence[int] | None,
                 cfg: AttributionConfig) -> Inputs:
    """Validate and pair the data, then load the SAE files and decide their layers."""
    completions, pairs = load_pairs(data, cfg.pairing)
    dataset = ({"path": str(data), "sha256": dataset_hash(data)}
               if isinstance(data, (str, os.PathLike)) else None)
    if isinstance(saes, Mapping):
        if layers is not None:
            raise LatentAuditError("Pass either {layer: SAE} or layers, not both.")
        layers = list(saes)
        saes = list(saes.values())
    elif isinstance(saes, (SAE, str, os.PathLike)):
        saes = [saes]
    by_layer = saes_by_layer([_load(s) for s in saes], layers)
    for sae in by_layer.values():
        check_sae_options(sae, cfg)
    return Inputs(completions, pairs, by_layer, dataset)


def check_sae_options(sae: SAE, cfg: AttributionConfig) -> None:
    """``cfg.hook`` is the SAE's hook point (or auto), and ``cfg.abar`` sae finds its mean
    activation; an error names the field (an :class:`~latentaudit.options.OptionError`)."""
    if cfg.hook not in ("auto", sae.info.hook):
        raise OptionError("hook", f"{config_file(sae)} reads the hook point {sae.info.hook} but "
                                  f"{{}} {cfg.hook} was given: pass {{}} {sae.info.hook} (or "
                                  f"auto), or an SAE trained at {cfg.hook}.")
    if cfg.abar == "sae" and sae.mean_activation is None:
        raise no_mean_activation(sae)


def no_mean_activation(sae: SAE) -> OptionError:
    """The error of ``abar`` sae for an SAE that stores no mean activation."""
    return OptionError("abar", f"{{}} sae was requested but {sae.info.source_path or 'the SAE'} "
                               "stores no mean activation; use {} dataset or {} zero.")


def _load(sae: SAESource) -> SAE:
    if isinstance(sae, SAE):
        return sae
    if not isinstance(sae, (str, os.PathLike)):
        raise LatentAuditError(f"{sae!r} is not an SAE: pass an SAE or the path of one.")
    from latentaudit.saes import load_sae

    return load_sae(sae, dtype="fp32")


def saes_by_layer(saes: Sequence[SAE], layers: int | Sequence[int] | None, *,
                  fields: tuple[str, str] = ("layer", "sae"),
                  name: Naming = flag) -> dict[int, SAE]:
    """The one layer rule: {layer: SAE}, in layer order.

    Without ``layers`` each SAE reads the one layer its config records; an SAE that records
    none, or several, is an error that names its file and field. With ``layers`` (one per SAE)
    each given layer must be one the SAE records, if it records any. A layer used twice, or an
    SAE at a hook point attribution does not read (:data:`POINTS`), is an error. ``fields``
    are the caller's option fields of the layers and the SAEs, which errors call
    ``name(field)``.
    """
    opt_layer, opt_sae = (name(f) for f in fields)
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else list(layers)
        if len(layers) != len(saes):
            raise LatentAuditError(
                f"{len(saes)} SAE(s) but {len(layers)} layer(s) given: give one layer "
                f"({opt_layer}) per SAE ({opt_sae}), or none to use the layer each SAE records.")
    out: dict[int, SAE] = {}
    for i, sae in enumerate(saes):
        recorded, field = recorded_layers(sae)
        where = config_file(sae)
        if layers is None:
            if len(recorded) != 1:
                raise LatentAuditError(
                    f"{where} does not record its layer (field '{field}'): pass {opt_layer} L."
                    if not recorded else
                    f"{where}: field '{field}' lists several layers "
                    f"({', '.join(map(str, recorded))}): pass {opt_layer} with the one to read.")
            layer = recorded[0]
        else:
            layer = layers[i]
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise LatentAuditError(f"{opt_layer} {layer!r} is not a layer: layers are "
                                       "numbered from 0.")
            if recorded and layer not in recorded:
                raise LatentAuditError(
                    f"{where} was trained on layer {', '.join(map(str, recorded))} (field "
                    f"'{field}') but layer {layer} was requested: pass {opt_layer} {recorded[0]} "
                    f"or an SAE for layer {layer}.")
        if layer in out:
            raise LatentAuditError(f"{opt_layer} {layer} is given twice: give each SAE its own "
                                   "layer.")
        if sae.info.hook not in POINTS:
            sae.check_hook(HOOK)
        out[layer] = sae
    return dict(sorted(out.items()))


def recorded_layers(sae: SAE) -> tuple[list[int], str]:
    """The layers an SAE's config records and the name of the field that records them."""
    for field, value in (("layer", sae.info.layer), ("layers", sae.info.extra.get("layers"))):
        values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise LatentAuditError(f"{config_file(sae)}: field '{field}' must be a layer number "
                                   f"(from 0), got {value!r}.")
        if values:
            return list(dict.fromkeys(values)), field
    return [], "layer"


def config_file(sae: SAE) -> str:
    """The file that describes an SAE: its config beside the weights, else the weights file."""
    if not sae.info.source_path:
        return "the SAE given in code"
    path = Path(sae.info.source_path)
    cfg = path.parent / CONFIG_FILE if path.is_file() else path / CONFIG_FILE
    return str(cfg if cfg.is_file() else path)


@dataclass
class Plan:
    """What the batch loop runs: one entry per paired completion, in dataset order."""

    used: list[int]
    """Indices into the data of the completions that take part in at least one pair."""
    weights: list[float]
    """Pair weight w_C of each used completion."""
    positive: list[bool]
    seqs: list[tuple[list[int], list[int]]]
    """(prompt ids, completion ids) of each used completion."""
    batches: list[list[int]]
    """Positions into ``used``, shortest sequences first."""
    pad_id: int


def make_plan(inputs: Inputs, tokenizer, max_len: int | None, batch_size: int) -> Plan:
    """Tokenize the paired completions and batch them by length."""
    used = inputs.pairing.used
    weights = inputs.pairing.weights(len(inputs.data))
    seqs = encode_completions(tokenizer, [inputs.data[i] for i in used], max_len)
    order = sorted(range(len(used)), key=lambda j: (len(seqs[j][0]) + len(seqs[j][1]), j))
    pad = pad_id(tokenizer)
    return Plan(used=used, weights=[weights[i] for i in used],
                positive=[inputs.data[i].positive for i in used], seqs=seqs,
                batches=[order[s:s + batch_size] for s in range(0, len(order), batch_size)],
                pad_id=pad)


def encode_completions(tokenizer, data: list[Completion], max_len: int | None
                       ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each completion; errors name the completion's file:line."""
    out = []
    for c in data:
        try:
            p = c.prompt_token_ids or prompt_ids(tokenizer, c.prompt, c.system)
        except LatentAuditError as err:
            raise LatentAuditError(f"{c.where}: {err}") from None
        q = c.completion_token_ids or completion_ids(tokenizer, c.completion)
        if not q:
            raise LatentAuditError(f"{c.where}: the completion has no tokens.")
        if max_len and len(p) + len(q) > max_len:
            raise LatentAuditError(
                f"{c.where}: prompt + completion is {len(p) + len(q)} tokens, more than the "
                f"model's {max_len} positions; shorten it.")
        out.append((p, q))
    return out


def check_model_config(model: str, saes: Mapping[int, SAE]) -> None:
    """Each SAE's layer and d_model against the model's ``config.json``, read without loading
    the model (skipped when the config is not on disk: the model loader checks later)."""
    import json

    from latentaudit.models import embedded

    short = embedded.canonical(model)
    if short in embedded.EMBEDDED:
        folder = embedded.cache_dir(short) if embedded.is_cached(short) else None
    else:
        folder = Path(model).expanduser() if Path(model).expanduser().is_dir() else None
    if folder is None or not (folder / "config.json").is_file():
        return
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    cfg = cfg.get("text_config") or cfg
    n_layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    d_model = cfg.get("hidden_size") or cfg.get("n_embd")
    for layer, sae in saes.items():
        if isinstance(n_layers, int) and layer >= n_layers:
            raise LatentAuditError(
                f"{config_file(sae)}: the SAE reads {HOOK} of layer {layer} but {model} has no "
                f"such hook point (its layers are 0..{n_layers - 1}): use an SAE trained on "
                "this model, or pass --layer with one of its layers.")
        if isinstance(d_model, int):
            sae.check_fits(d_model, model_name=model)
