"""The explain driver: check inputs → load the model → lens, examples, maps, exact → write.

Everything that can be checked without the model (the run folder, the latents, the SAE files,
the dataset, the reference text unless cached, the options, the interpretation client) is
checked before it loads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from latentaudit.attribution.plan import HOOK, POINTS
from latentaudit.errors import LatentAuditError
from latentaudit.executor import as_executor
from latentaudit.explain import examples as ex
from latentaudit.explain.config import ExplainConfig
from latentaudit.explain.exact import exact_changes, exact_check
from latentaudit.explain.inputs import Inputs, LayerExact, Maps
from latentaudit.explain.maps import completion_maps, sample_pairs
from latentaudit.explain.output import ExplainResult, assemble, write_explain
from latentaudit.explain.run import RunFolder, choose_latents, read_run
from latentaudit.models import load as model_load
from latentaudit.models.forward import pad_id
from latentaudit.models.hooks import layer_device, layer_module
from latentaudit.models.load import LoadedModel
from latentaudit.saes.sae import SAE
from latentaudit.saes.stream import place

log = logging.getLogger(__name__)


def check_inputs(run: str | os.PathLike, latents: Sequence[int] | None, layer: int | None,
                 cfg: ExplainConfig, model_name: str | None, dtype: str,
                 sae: SAE | str | os.PathLike | None, data: str | os.PathLike | None,
                 cache_dir) -> Inputs:
    """Read the run and every input of the stage, with one clear error for any problem."""
    folder = read_run(run)
    chosen = choose_latents(folder, cfg.top_k, latents, layer)
    extra = max(cfg.rescore, cfg.exact_top) if cfg.exact_pairs else 0
    scored = {L: list(dict.fromkeys(ids + [r["latent"] for r in folder.ranked(L)][:extra]))
              for L, ids in chosen.items()}
    if sae is not None and len(chosen) > 1:
        raise LatentAuditError(f"--sae replaces the SAE of one layer but the run {folder.path} "
                               f"has layers {', '.join(map(str, chosen))}: pass --layer too.")
    saes = {L: _load_sae(folder, L, sae) for L in chosen}
    data_rows, pairs = _load_data(folder, data, cfg)
    name = model_name or folder.model_name
    from latentaudit.models.embedded import canonical

    name = canonical(name)
    dtype_name = str(model_load.parse_dtype(dtype)).replace("torch.", "")
    keys = {L: ex.cache_key(s, name, dtype_name, L, cfg) for L, s in saes.items()}
    if not all(ex.is_cached(k, cache_dir) for k in keys.values()):
        from latentaudit.saes.evaluate import text_documents

        text_documents(cfg.corpus)  # a missing corpus fails here, before the model loads
    return Inputs(folder, chosen, scored, saes, data_rows, pairs, keys, name,
                  latents is not None)


def _load_sae(run: RunFolder, layer: int, given, points: tuple[str, ...] = POINTS) -> SAE:
    """The SAE of a run's layer (or ``given``), which must read one of ``points``."""
    from latentaudit.saes import load_sae

    if isinstance(given, SAE):
        sae = given
    else:
        path = given or run.sae_path(layer)
        if not Path(path).exists():
            raise LatentAuditError(
                f"{run.path / 'manifest.json'}: the SAE of layer {layer} ({path}, field "
                f"'saes.{layer}.path') does not exist: pass --sae with its path.")
        sae = load_sae(path, dtype="fp32")
    if sae.info.hook not in points:
        sae.check_hook(HOOK)
    d_sae = run.delta_attribution(layer).numel()
    if sae.d_sae != d_sae:
        raise LatentAuditError(
            f"{sae.info.source_path or 'the SAE'} has d_sae={sae.d_sae} but the run's layer "
            f"{layer} has {d_sae} latents: pass the SAE the run used (--sae).")
    return sae


def _load_data(run: RunFolder, data, cfg: ExplainConfig):
    if not cfg.maps and not cfg.exact_pairs and not cfg.effect_texts:
        return None, []
    rows, pairing, _ = run.pairs(data, "pass --data, or --no-maps --exact-pairs 0.",
                                 "the maps and the exact check")
    return rows, sample_pairs(pairing.pairs, 0, cfg.seed)


def explain_latents(run: str | os.PathLike, latents: Sequence[int] | None = None,
                    cfg: ExplainConfig | None = None, *, layer: int | None = None,
                    model: LoadedModel | str | None = None,
                    sae: SAE | str | os.PathLike | None = None,
                    data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None, device: str = "auto",
                    dtype: str = "float32", engine=None) -> ExplainResult:
    """Explain the top latents of an attribution run (or ``latents`` at ``layer``) and write
    ``<run>/explain/`` (or ``out``); see :mod:`latentaudit.explain` for the files.

    model: a :class:`~latentaudit.models.load.LoadedModel` or a name (default: the run's model),
    loaded on ``device`` in ``dtype`` after every other input checked out. sae / data replace the
    run's SAE (one layer) and dataset when they have moved. cache_dir: where the per-SAE example
    cache lives (default ``$LATENTAUDIT_CACHE``, else ``~/.cache/latentaudit``). engine: an
    :class:`~latentaudit.executor.Executor` (or its ``EngineConfig``); with ``--engine ray`` the
    top-activating scan of the corpus runs on Ray workers.
    """
    cfg = cfg or ExplainConfig()
    if not isinstance(model, LoadedModel):
        model_load.resolve_device(device)
    loaded_dtype = dtype if not isinstance(model, LoadedModel) else \
        str(next(model.model.parameters()).dtype).replace("torch.", "")
    name = model.name if isinstance(model, LoadedModel) else model
    inputs = check_inputs(run, latents, layer, cfg, name, loaded_dtype, sae, data, cache_dir)
    out = Path(out) if out else inputs.run.path / "explain"
    interpreter = _interpreter(cfg, out)
    if not isinstance(model, LoadedModel):
        model = model_load.load_model(inputs.model_name, device=device, dtype=dtype)
    chunks = {}
    for L, s in inputs.saes.items():
        layer_module(model.model, L)  # a clear error for a layer the model lacks
        s.check_fits(model.d_model, model_name=model.name)
        chunks[L] = place(s, layer_device(model.model, L))  # or streamed from host memory
    corpus = _corpus_examples(model, inputs, cfg, cache_dir, engine, chunks)
    maps, exact = _maps_and_exact(model, inputs, cfg)
    effects = _output_effects(model, inputs, cfg, exact)
    result = assemble(model, inputs, cfg, corpus, maps, exact, interpreter, out, effects)
    write_explain(result)
    return result


def _corpus_examples(model: LoadedModel, inputs, cfg: ExplainConfig, cache_dir, engine,
                     chunks: dict) -> dict[int, ex.CorpusExamples]:
    """The top-activating scan of each layer, here or on Ray workers."""
    executor = as_executor(engine)
    if not executor.distributed or all(
            ex.is_cached(inputs.keys[L], cache_dir) for L in inputs.saes):
        return {L: ex.corpus_examples(model, s, L, cfg, inputs.keys[L], cache_dir,
                                      chunk=chunks[L])
                for L, s in inputs.saes.items()}
    return executor.corpus_examples(model, inputs.saes, cfg, inputs.keys, cache_dir)


def _interpreter(cfg: ExplainConfig, out: Path):
    if cfg.interpret_model is None:
        return None
    from latentaudit.explain.interpret import Interpreter

    return Interpreter(cfg.interpret_model, base_url=cfg.interpret_base_url,
                       api_key_env=cfg.interpret_api_key_env, timeout=cfg.interpret_timeout,
                       cache=out / "interpret_cache.jsonl")


def _maps_and_exact(model: LoadedModel, inputs: Inputs, cfg: ExplainConfig
                    ) -> tuple[Maps | None, dict[int, LayerExact]]:
    """Maps of the sampled completions, then the exact check of each layer."""
    if inputs.data is None:
        return None, {}
    from latentaudit.attribution.plan import encode_completions

    n_map = (len(inputs.pairs) if not cfg.map_pairs else cfg.map_pairs) if cfg.maps else 0
    if not n_map and not cfg.exact_pairs:
        return None, {}
    exact_pairs = inputs.pairs[:cfg.exact_pairs]
    pairs = inputs.pairs[:max(n_map, len(exact_pairs))]
    rows = sorted({i for pair in pairs for i in pair})
    max_len = getattr(model.model.config, "max_position_embeddings", None)
    seqs = encode_completions(model.tokenizer, [inputs.data[i] for i in rows], max_len)
    run = inputs.run
    a_bars = {L: run.vector("a_bar", L, "pt").to(model.device) for L in inputs.scored}
    dirs = {L: s.decoder_directions(rows=inputs.scored[L]).to(layer_device(model.model, L))
            for L, s in inputs.saes.items()}
    positions = run.option.get("positions", "all")
    pad = pad_id(model.tokenizer)
    points = {L: s.info.hook for L, s in inputs.saes.items()}
    maps = completion_maps(model, seqs, dirs, a_bars, positions, cfg.batch_size, pad, points)
    at = {i: r for r, i in enumerate(rows)}
    exact = {}
    for L in inputs.scored if exact_pairs else []:
        used = sorted({i for pair in exact_pairs for i in pair})
        change = exact_changes(model.model, L, [seqs[at[i]] for i in used], dirs[L], a_bars[L],
                               positions, cfg.exact_batch_size, point=points[L])
        first = torch.stack([maps[at[i]].deltas[L].sum(0) for i in used])  # (C, n)
        where = {i: r for r, i in enumerate(used)}
        check = exact_check(change.change, first, [(where[p], where[q]) for p, q in exact_pairs])
        exact[L] = LayerExact(check, change, used, list(exact_pairs))
    return Maps(rows, pairs, maps, dict(inputs.scored)), exact


def _output_effects(model: LoadedModel, inputs: Inputs, cfg: ExplainConfig,
                    exact: dict[int, LayerExact]) -> dict[int, dict[int, dict]]:
    """{layer: {latent: output_effect row}} of the latents each layer explains, read on the
    first ``effect_texts`` completions of the sampled pairs (:mod:`.effect`)."""
    if inputs.data is None or not cfg.effect_texts:
        return {}
    from latentaudit.attribution.plan import encode_completions
    from latentaudit.explain.effect import moved_tokens, output_effects
    from latentaudit.explain.output import explained_latents
    from latentaudit.models.norm import mean_resid_norm

    rows = list(dict.fromkeys(i for pair in inputs.pairs for i in pair))[:cfg.effect_texts]
    max_len = getattr(model.model.config, "max_position_embeddings", None)
    seqs = encode_completions(model.tokenizer, [inputs.data[i] for i in rows], max_len)
    out = {}
    for L, sae in inputs.saes.items():
        latents = explained_latents(inputs, cfg, L, exact.get(L))
        alpha = cfg.effect_strength * mean_resid_norm(model, L, [p + q for p, q in seqs])
        dev = layer_device(model.model, L)
        eff = output_effects(model.model, L, seqs, sae.decoder_directions(rows=latents).to(dev),
                             inputs.run.vector("a_bar", L, "pt").to(dev), alpha,
                             point=sae.info.hook)
        common = {"strength": cfg.effect_strength, "alpha": eff.alpha,
                  "completions": [inputs.data[i].line for i in rows],
                  "positions": eff.positions, "route": eff.route}
        out[L] = {i: {**common, "added": moved_tokens(eff.added[n], model.tokenizer,
                                                       cfg.lens_tokens),
                      "ablated": moved_tokens(eff.ablated[n], model.tokenizer, cfg.lens_tokens)}
                  for n, i in enumerate(latents)}
    return out
