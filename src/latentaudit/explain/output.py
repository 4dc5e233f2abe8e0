"""Assemble the explain stage's rows and write its files (formats: :mod:`latentaudit.explain`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from latentaudit._io import save_safetensors, write_json, write_jsonl
from latentaudit.data.corpus import content_warning
from latentaudit.explain.config import ExplainConfig
from latentaudit.explain.inputs import Inputs, LayerExact, Maps
from latentaudit.explain.maps import map_summary, pair_weights, stack_maps
from latentaudit.explain.topk import HIST_EDGES
from latentaudit.models.lens import (
    logit_lens,
    promoted_suppressed,
    through_norm,
    token_strings,
    unembedding,
)
from latentaudit.saes.releases import neuronpedia_url

if TYPE_CHECKING:
    from latentaudit.explain.examples import CorpusExamples

SCHEMA_VERSION = 1


@dataclass
class ExplainResult:
    """What :func:`~latentaudit.explain.explain_latents` computed, as written to ``out``."""

    latents: list[dict[str, Any]]
    """Rows of latents.jsonl, in final order, layer by layer."""
    completions: list[dict[str, Any]]
    """Rows of completions.jsonl ([] without maps)."""
    token_maps: dict[str, Tensor]
    """The arrays of token_maps.safetensors ({} without maps)."""
    exact: dict[str, Any]
    """The content of exact.json ({} without the exact check)."""
    manifest: dict[str, Any]
    out: Path


def final_order(ranked: list[int], exact_delta: dict[int, float], rescore: int) -> list[int]:
    """The ranking with its top ``rescore`` latents re-ordered by exact Δ, largest first."""
    if not rescore:
        return list(ranked)
    top = sorted(ranked[:rescore], key=lambda i: -exact_delta[i])
    return top + list(ranked[rescore:])


def example_rows(corpus: CorpusExamples, latent: int, before: int, tokenizer) -> list[dict]:
    """The top-activating examples of one latent, largest first, windows trimmed to the text."""
    top = corpus.top
    rows = []
    for j in range(top.values.shape[1]):
        if top.sequence[latent, j] < 0:
            break
        ids = top.window_ids[latent, j].tolist()
        keep = [w for w, t in enumerate(ids) if t >= 0]
        rows.append({"activation": float(top.values[latent, j]),
                     "sequence": int(top.sequence[latent, j]),
                     "position": int(top.position[latent, j]),
                     "max_index": before - keep[0],
                     "token_ids": [ids[w] for w in keep],
                     "tokens": token_strings(tokenizer, [ids[w] for w in keep]),
                     "activations": [float(top.window_acts[latent, j, w]) for w in keep]})
    return rows


def density_row(corpus: CorpusExamples, latent: int) -> dict:
    fired = int(corpus.density.fired[latent])
    return {"tokens": corpus.tokens, "fired": fired,
            "frequency": fired / corpus.tokens if corpus.tokens else 0.0,
            "histogram": corpus.density.histogram[latent].tolist()}


def lens_rows(model, directions: Tensor, cfg: ExplainConfig) -> list[dict]:
    """Cosine, promoted and suppressed tokens of each direction."""
    W = unembedding(model.model)
    cos = logit_lens(directions.to(W.device), W, k=cfg.lens_tokens)
    if cfg.through_final_norm:
        from latentaudit.models.upper import final_norm

        directions = through_norm(directions, final_norm(model.model))
    ps = promoted_suppressed(directions.to(W.device), W, k=cfg.lens_tokens)
    tok = model.tokenizer

    def listed(ids: Tensor, values: Tensor) -> list[dict]:
        return [{"token": s, "token_id": i, "value": v} for s, i, v in
                zip(token_strings(tok, ids.tolist()), ids.tolist(), values.tolist(), strict=True)]

    return [{"cosine": token_strings(tok, cos.token_ids[n].tolist()),
             "promoted": listed(ps.promoted_ids[n], ps.promoted[n]),
             "suppressed": listed(ps.suppressed_ids[n], ps.suppressed[n]),
             "through_final_norm": cfg.through_final_norm} for n in range(len(directions))]


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def orders(inputs: Inputs, cfg: ExplainConfig, layer: int, exact: LayerExact | None
           ) -> tuple[dict[int, int], dict[int, int], dict[int, float]]:
    """({latent: rank in ranking.jsonl}, {latent: final rank}, {latent: exact Δ}) of a layer."""
    ranked = [r["latent"] for r in inputs.run.ranked(layer)]
    exact_delta = ({i: float(exact.check.exact_delta[c])
                    for c, i in enumerate(inputs.scored[layer])} if exact else {})
    order = final_order(ranked, exact_delta, cfg.rescore)
    return ({i: n for n, i in enumerate(ranked, 1)}, {i: n for n, i in enumerate(order, 1)},
            exact_delta)


def explained_latents(inputs: Inputs, cfg: ExplainConfig, layer: int,
                      exact: LayerExact | None) -> list[int]:
    """The latents a layer's rows hold, in final order (the given ones, or the top ``top_k``
    after any re-scoring)."""
    _, final, _ = orders(inputs, cfg, layer, exact)
    if inputs.given:
        return sorted(inputs.chosen[layer], key=lambda i: final.get(i, math.inf))
    return sorted(final, key=final.get)[:cfg.top_k]


def layer_rows(model, inputs: Inputs, cfg: ExplainConfig, layer: int, corpus: CorpusExamples,
               maps: Maps | None, exact: LayerExact | None,
               effects: dict[int, dict] | None = None) -> list[dict]:
    """The latents.jsonl rows of one layer, in final order."""
    run, scored = inputs.run, inputs.scored[layer]
    rank, final, exact_delta = orders(inputs, cfg, layer, exact)
    latents = explained_latents(inputs, cfg, layer, exact)
    lenses = lens_rows(model, inputs.saes[layer].decoder_directions()[latents], cfg)
    np_id = inputs.saes[layer].info.extra.get("neuronpedia_id")
    attribution = run.delta_attribution(layer)
    activation = run.delta_activation(layer)
    rows = []
    for i, lens in zip(latents, lenses, strict=True):
        c = scored.index(i)
        rows.append({
            "layer": layer, "latent": i, "rank": rank.get(i), "final_rank": final.get(i),
            "delta_attribution": float(attribution[i]),
            "delta_activation": None if activation is None else float(activation[i]),
            "exact_delta": exact_delta.get(i),
            "first_order_delta": float(exact.check.first_order_delta[c]) if exact else None,
            "logit_lens": lens, "output_effect": (effects or {}).get(i),
            "density": density_row(corpus, i),
            "top_examples": example_rows(corpus, i, cfg.context_before, model.tokenizer),
            "attribution_map": _map_summary(inputs, maps, layer, c, model.tokenizer),
            "explanation": None})
        if np_id:
            rows[-1]["neuronpedia_url"] = neuronpedia_url(np_id, i)
    return rows


def _map_summary(inputs: Inputs, maps: Maps | None, layer: int, column: int, tokenizer):
    if maps is None:
        return None
    data = inputs.data
    tokens = [token_strings(tokenizer, m.token_ids) for m in maps.maps]
    return map_summary(maps.maps, [data[i].positive for i in maps.rows], layer, column, tokens,
                       [data[i].line for i in maps.rows])


def completion_rows(inputs: Inputs, maps: Maps, tokenizer) -> list[dict]:
    """Rows of completions.jsonl, one per mapped completion, in token_maps order."""
    data = inputs.data
    weights = pair_weights(maps.pairs)
    rows, offset = [], 0
    for i, m in zip(maps.rows, maps.maps, strict=True):
        c = data[i]
        rows.append({"index": len(rows), "line": c.line, "prompt_id": c.prompt_id,
                     "label": c.label, "weight": weights.get(i, 0.0),
                     "offset": offset, "n_tokens": len(m.token_ids), "n_prompt_tokens": m.n_prompt,
                     "tokens": token_strings(tokenizer, m.token_ids), "loss": m.loss,
                     "delta": [float(x) for L in maps.columns for x in m.deltas[L].sum(0)]})
        offset += len(m.token_ids)
    return rows


def exact_json(inputs: Inputs, cfg: ExplainConfig, exact: dict[int, LayerExact]) -> dict:
    """The content of exact.json."""
    if not exact:
        return {}
    data = inputs.data
    layers = {}
    for L, e in exact.items():
        rank, final, _ = orders(inputs, cfg, L, e)
        layers[str(L)] = {
            "latents": inputs.scored[L], "ranks": [rank.get(i) for i in inputs.scored[L]],
            "final_ranks": [final.get(i) for i in inputs.scored[L]], "route": e.change.route,
            "completions": [data[i].line for i in e.completions],
            "pairs": [[data[p].line, data[q].line] for p, q in e.pairs],
            "clean_loss": e.change.clean.tolist(),
            "exact_loss_change": e.change.change.tolist(),
            "exact_delta": e.check.exact_delta.tolist(),
            "first_order_delta": e.check.first_order_delta.tolist(),
            "spearman": _num(e.check.rho),
            "spearman_per_completion": [_num(r) for r in e.check.rho_per_completion],
            "spearman_per_completion_mean": _mean(e.check.rho_per_completion)}
    return {"schema_version": SCHEMA_VERSION, "layers": layers}


def _mean(values: list[float]) -> float | None:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else None


def write_explain(result: ExplainResult) -> None:
    """Write the stage's files into ``result.out``, each atomically."""
    out = result.out
    write_jsonl(out / "latents.jsonl", result.latents)
    if result.token_maps:
        save_safetensors(out / "token_maps.safetensors", result.token_maps,
                         metadata={"schema_version": str(SCHEMA_VERSION)})
        write_jsonl(out / "completions.jsonl", result.completions)
    if result.exact:
        write_json(out / "exact.json", result.exact)
    write_json(out / "manifest.json", result.manifest)
    stale = {"token_maps.safetensors": not result.token_maps,
             "completions.jsonl": not result.token_maps, "exact.json": not result.exact}
    for name, old in stale.items():
        if old:  # left by an earlier run with other options: it would not match this one
            (out / name).unlink(missing_ok=True)


def corpus_manifest(cfg: ExplainConfig, corpus: dict[int, CorpusExamples]) -> dict:
    first = next(iter(corpus.values()))
    warnings = {s: content_warning(s) for s in ("brown", "sotu", "nlp-corpus", "gutenberg")}
    used = [w for s, w in warnings.items() if w and (cfg.corpus in (s, "held-out"))]
    return {"spec": cfg.corpus, "tokens": first.tokens, "sequences": first.sequences,
            "context_len": cfg.context_len, "skip_first": cfg.skip_first,
            "cache": {str(L): {"key": c.key, "file": str(c.path)} for L, c in corpus.items()},
            "content_warnings": used}


def assemble(model, inputs: Inputs, cfg: ExplainConfig, corpus: dict[int, CorpusExamples],
             maps: Maps | None, exact: dict[int, LayerExact], interpreter, out: Path,
             effects: dict[int, dict[int, dict]] | None = None) -> ExplainResult:
    """Every row and array of the stage's files."""
    rows = [r for L in inputs.chosen
            for r in layer_rows(model, inputs, cfg, L, corpus[L], maps, exact.get(L),
                                (effects or {}).get(L))]
    if interpreter is not None:
        from latentaudit.explain.interpret import interpret_prompt

        prompts = [interpret_prompt(r["top_examples"], [t["token"] for t in
                                                         r["logit_lens"]["promoted"]],
                                    [t["token"] for t in r["logit_lens"]["suppressed"]])
                   for r in rows]
        for r, line in zip(rows, interpreter.explain(prompts), strict=True):
            r["explanation"] = line
    columns = [(L, i) for L, ids in (maps.columns.items() if maps else []) for i in ids]
    manifest = {
        "schema_version": SCHEMA_VERSION, "stage": "explain", "run": str(inputs.run.path),
        "model": inputs.model_name, "layers": list(inputs.chosen),
        "latents": [{"layer": r["layer"], "latent": r["latent"]} for r in rows],
        "source": "latents" if inputs.given else "ranking", "positions":
            inputs.run.option.get("positions", "all"),
        "corpus": corpus_manifest(cfg, corpus), "density_histogram_edges": HIST_EDGES.tolist(),
        "map_columns": [{"layer": L, "latent": i} for L, i in columns],
        "exactness": {str(L): {"route": e.change.route, "pairs": len(e.pairs),
                          "spearman": _num(e.check.rho),
                          "spearman_per_completion_mean": _mean(e.check.rho_per_completion)}
                      for L, e in exact.items()},
        "interpretation": None if interpreter is None else
            {"model": interpreter.model, "base_url": interpreter.base_url},
        "options": asdict(cfg), "versions": _versions()}
    return ExplainResult(
        latents=rows, completions=completion_rows(inputs, maps, model.tokenizer) if maps else [],
        token_maps=stack_maps(maps.maps, columns) if maps else {},
        exact=exact_json(inputs, cfg, exact), manifest=manifest, out=out)


def _versions() -> dict[str, str]:
    import platform

    import transformers

    from latentaudit import __version__

    return {"latentaudit": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
