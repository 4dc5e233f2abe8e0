"""The attribution driver: check inputs → load the model → plan → batch loop → finish.

Everything that can be checked without the model (options, the dataset and its pairs, the SAE
files and their layers) is checked before the model loads, so a bad input fails in well under a
second instead of after the load.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from latentaudit.attribution.accumulate import run_batches
from latentaudit.attribution.config import AttributionConfig, AttributionResult
from latentaudit.attribution.finish import finish
from latentaudit.attribution.plan import (
    Data,
    Inputs,
    Plan,
    SAEs,
    check_inputs,
    check_model_config,
    make_plan,
)
from latentaudit.batching import resolve_batch_size
from latentaudit.errors import LatentAuditError
from latentaudit.executor import EngineConfig, Executor, as_executor
from latentaudit.models import load as model_load
from latentaudit.models.hooks import layer_device, layer_module, num_layers
from latentaudit.models.load import LoadedModel
from latentaudit.saes.stream import place


def attribute(model: LoadedModel | str | os.PathLike, saes: SAEs, data: Data,
              cfg: AttributionConfig | None = None, *,
              layers: int | Sequence[int] | None = None,
              checkpoint: str | os.PathLike | None = None,
              device: str = "auto", dtype: str = "float32",
              engine: EngineConfig | Executor | None = None) -> AttributionResult:
    """Rank SAE latents by Δ-attribution for a behaviour dataset.

    model: a :class:`~latentaudit.models.load.LoadedModel`, or a short name, folder or hub id
    that is loaded (on ``device`` in ``dtype``) only after every other input checked out; the
    SAEs are then moved to its device.
    saes: an SAE or the path of one, a list of them, or {layer: SAE}; each reads the layer its
    config records, or the matching entry of ``layers`` (see
    :func:`~latentaudit.attribution.plan.saes_by_layer`). data: a behaviour JSONL path or a list
    of :class:`~latentaudit.data.behaviour.Completion`. checkpoint: a file for resumable
    checkpoints (a rerun with the same inputs continues from it). engine: the executor (or its
    :class:`~latentaudit.executor.EngineConfig`); with ``--engine ray`` the completions are
    sharded across Ray workers (``model`` must then be a name or path, and ``checkpoint`` is a
    folder of finished shards).
    """
    cfg = cfg or AttributionConfig()
    executor = as_executor(engine)
    if executor.distributed:
        if isinstance(model, LoadedModel):
            raise LatentAuditError("--engine ray: pass the model by name or path (every worker "
                                   "loads its own copy), not a loaded model.")
    if not isinstance(model, LoadedModel):
        model_load.parse_dtype(dtype)
        model_load.resolve_device(device)
    inputs = check_inputs(saes, data, layers, cfg)
    if not isinstance(model, LoadedModel):
        check_model_config(str(model), inputs.saes)
    if executor.distributed:
        return executor.attribute(str(model), inputs, cfg, checkpoint=checkpoint, device=device,
                                  dtype=dtype)
    if not isinstance(model, LoadedModel):
        model = model_load.load_model(str(model), device=device, dtype=dtype)
    return attribute_checked(model, inputs, cfg, checkpoint)


def attribute_checked(model: LoadedModel, inputs: Inputs, cfg: AttributionConfig,
                      checkpoint: str | os.PathLike | None = None) -> AttributionResult:
    """:func:`attribute` on inputs already checked by
    :func:`~latentaudit.attribution.plan.check_inputs` (for callers that check before they load
    the model, e.g. the pipeline of :mod:`latentaudit.pipeline`)."""
    plan, cfg, chunks = prepare(model, inputs, cfg)
    sums = run_batches(model, inputs.saes, plan, cfg, checkpoint, chunks)
    return finish(model, inputs, plan, sums, cfg)


def prepare_plan(model: LoadedModel, inputs: Inputs, cfg: AttributionConfig) -> Plan:
    """The batches of :func:`prepare` (what a Ray worker needs to find its shard)."""
    return prepare(model, inputs, cfg)[0]


def prepare(model: LoadedModel, inputs: Inputs, cfg: AttributionConfig
            ) -> tuple[Plan, AttributionConfig, dict]:
    """Place the SAEs, check that they fit the model, and plan the batches.

    Each SAE goes to the device of its hooked layer, or stays in host memory and is streamed
    when it does not fit there (:func:`~latentaudit.saes.stream.place`); a batch size of 0 is
    chosen from free device memory for the plan's longest sequence.
    """
    chunks = {}
    for layer, sae in inputs.saes.items():
        layer_module(model.model, layer)  # a clear error for a layer the model lacks
        sae.check_fits(model.d_model, model_name=model.name)
        chunks[layer] = place(sae, layer_device(model.model, layer), cfg.sae_chunk)
    max_len = getattr(model.model.config, "max_position_embeddings", None)
    plan = make_plan(inputs, model.tokenizer, max_len, cfg.batch_size or len(inputs.data) or 1)
    if not cfg.batch_size:
        cfg = replace(cfg, batch_size=_auto_batch_size(model, plan, min(inputs.saes)))
        order = [j for b in plan.batches for j in b]
        plan.batches = [order[s:s + cfg.batch_size]
                        for s in range(0, len(order), cfg.batch_size)]
    return plan, cfg, chunks


def _auto_batch_size(model: LoadedModel, plan: Plan, lowest: int) -> int:
    """Completions per batch from free device memory, for rows as long as the longest."""
    longest = max((len(p) + len(q) for p, q in plan.seqs), default=1)
    completion = max((len(q) for _, q in plan.seqs), default=1)
    layers = num_layers(model.model) - lowest
    return resolve_batch_size(0, model.model, model.device, "backward", longest,
                              AttributionConfig.batch_size, "attribute", layers=layers,
                              logit_tokens=completion + 1)
