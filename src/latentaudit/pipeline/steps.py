"""What each stage of a run does: the stage modules' own functions, with the run's paths.

Each step checks its inputs, then asks for the model (loaded once per run, on the first step
that needs it), runs the stage and returns a short summary for ``pipeline.json``. A step resumes
by the stage's own mechanism, through the same paths: the sample file (rows already there are
skipped), the judge cache, the attribution checkpoint, explain's example cache, the steering
completions file.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from latentaudit import runfolder as rf
from latentaudit.errors import LatentAuditError
from latentaudit.pipeline.checks import steer_prompts
from latentaudit.pipeline.config import RunConfig
from latentaudit.pipeline.stages import completions_path, dataset_path, judged_path

log = logging.getLogger(__name__)


class StageSkipped(Exception):
    """Raised by a step that cannot run here (the report, before it exists): recorded as
    skipped, with the message as the reason."""


class Models:
    """The model under study, loaded once, when a step first asks for it."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.loaded = cfg, None
        self.seconds = 0.0
        """Time the load took (a first run of an embedded model includes building its cache)."""

    def __call__(self):
        if self.loaded is None:
            import time

            from latentaudit.models import load

            s = self.cfg.settings
            log.info("loading %s (%s, %s)", s.model, s.device, s.dtype)
            start = time.perf_counter()
            self.loaded = load.load_model(s.model, device=s.device, dtype=s.dtype)
            self.seconds = time.perf_counter() - start
        return self.loaded


@dataclass
class Context:
    """What a step gets."""

    cfg: RunConfig
    sae: str
    """The SAE's resolved path."""
    model: Models
    fresh: bool
    """Whether the stage starts again (its fingerprint changed) rather than resumes."""

    @property
    def run(self) -> Path:
        return self.cfg.out

    def plan_or_restart(self, plan: Callable[[], Any], files: list[Path]) -> Any:
        """``plan()``; when a stage that starts again finds files its planner refuses (made
        with other settings), they are removed and it plans again."""
        try:
            return plan()
        except LatentAuditError as err:
            if not self.fresh or not any(f.exists() for f in files):
                raise
            log.info("starting again: %s", err)
            for f in files:
                shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
            return plan()


def _dtype_name(dtype: str) -> str:
    from latentaudit.models.load import parse_dtype

    return str(parse_dtype(dtype)).removeprefix("torch.")


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def sample(ctx: Context) -> dict[str, Any]:
    from latentaudit.models.embedded import canonical
    from latentaudit.sample import manifest_path, plan_sampling, run_sampling

    s, out = ctx.cfg.settings, ctx.run / rf.COMPLETIONS
    plan = ctx.plan_or_restart(
        lambda: plan_sampling(s.prompts, ctx.cfg.sample, out, model=canonical(s.model),
                              dtype=_dtype_name(s.dtype)), [out, manifest_path(out)])
    if plan.todo or plan.previous is None:
        run_sampling(ctx.model(), plan)
    return {"prompts": len(plan.prompts), "completions": _count_lines(out)}


def _judge_options(spec: str, ctx: Context) -> dict[str, Any]:
    """Constructor options of the judge ``spec`` (a probe of the run's model shares it)."""
    from latentaudit.judges import JudgeSpec, backend_options, load_rubric
    from latentaudit.models.embedded import canonical

    o, s = ctx.cfg.judge, ctx.cfg.settings
    parsed = JudgeSpec.parse(spec, load_rubric(s.rubric))
    options = backend_options(parsed, o, s.device, s.dtype)
    if parsed.backend == "probe":
        from latentaudit.judges.probe import load_probe

        reads = o.judge_model or load_probe(parsed.arg or s.rubric).model
        if canonical(reads) == canonical(s.model):
            return dict(model=ctx.model(), batch_size=options["batch_size"])
    return options


def judge(ctx: Context) -> dict[str, Any]:
    from latentaudit.judges import load_rubric, make_judge, resolve_spec
    from latentaudit.judges.run import items_from_rows, judge_file, read_completions

    path, rubric = completions_path(ctx.cfg), load_rubric(ctx.cfg.settings.rubric)
    items_from_rows(read_completions(path), rubric, path)  # before a judge model loads
    spec = resolve_spec(ctx.cfg.judge.judge, rubric)
    judge = make_judge(spec, rubric, **_judge_options(spec, ctx))
    done = judge_file(path, rubric, judge, ctx.run / rf.JUDGED, ctx.run / rf.JUDGE_CACHE)
    failures = done.run.failures
    if failures and not ctx.cfg.judge.allow_failures:
        raise LatentAuditError(
            f"judge: {len(failures)} of {len(done.run.verdicts)} completions could not be graded "
            f"(first: {failures[0].prompt_id} #{failures[0].sample_index}: {failures[0].error}); "
            "rerun to retry them, or set allow_failures = true in [judge] to go on without them.")
    return {"judge": done.judge, "completions": len(done.run.verdicts),
            "from_cache": done.run.n_cached, "failures": len(failures), **done.outcomes}


def pair(ctx: Context) -> dict[str, Any]:
    from latentaudit.pair import pair_file

    result = pair_file(judged_path(ctx.cfg), ctx.run / rf.DATASET, ctx.cfg.settings.rubric,
                       ctx.cfg.pair.pairing)
    total: Counter = Counter()
    for c in result.counts.values():
        total.update(c)
    both = len(result.counts) - len(result.pairing.skipped_prompts)
    if not result.pairing.pairs:
        raise LatentAuditError(
            f"pair: no prompt has both a positive and a negative completion ({total['positive']} "
            f"positive, {total['negative']} negative, {total['excluded']} excluded); sample more "
            "completions per prompt ([sample] n) or more prompts.")
    return {"positive": total["positive"], "negative": total["negative"],
            "excluded": total["excluded"], "pairs": len(result.pairing.pairs),
            "prompts": len(result.counts), "prompts_with_pairs": both,
            "excluded_why": dict(result.reasons)}


def attribute(ctx: Context) -> dict[str, Any]:
    from latentaudit.attribution import engine
    from latentaudit.attribution.output import write_run
    from latentaudit.attribution.plan import check_inputs

    s, cfg = ctx.cfg.settings, ctx.cfg.attribute
    inputs = check_inputs([ctx.sae], str(dataset_path(ctx.cfg)), s.layer, cfg)
    result = engine.attribute_checked(ctx.model(), inputs, cfg, ctx.run / rf.CHECKPOINT)
    write_run(ctx.run, result)
    layer = next(iter(result.layers))
    return {"layer": layer, "completions": result.n_completions, "pairs": result.n_pairs,
            "prompts": result.n_prompts, "tokens": result.n_tokens,
            "top": [r.latent for r in result.ranking[:10]]}


def _corpus_from_dataset(dataset: Path, out: Path) -> Path:
    """The dataset's distinct prompts and its completions as a reference text (JSONL)."""
    from latentaudit._io import write_jsonl
    from latentaudit.data.behaviour import load_behaviour
    from latentaudit.data.tokens import is_chat_messages

    rows = load_behaviour(dataset)
    prompts = dict.fromkeys(
        " ".join(m["content"] for m in r.prompt) if is_chat_messages(r.prompt) else r.prompt
        for r in rows)
    write_jsonl(out, [{"text": t} for t in [*prompts, *(r.completion for r in rows)]])
    return out


def explain(ctx: Context) -> dict[str, Any]:
    from latentaudit.explain import engine

    cfg, dataset = ctx.cfg.explain, dataset_path(ctx.cfg)
    if cfg.corpus == "dataset":
        cfg = replace(cfg, corpus=str(_corpus_from_dataset(dataset,
                                                           ctx.run / rf.EXPLAIN_CORPUS)))
    s, cache = ctx.cfg.settings, ctx.cfg.explain_cache_dir
    if ctx.model.loaded is None:  # check before the model loads
        engine.check_inputs(ctx.run, None, None, cfg, s.model, s.dtype, None, dataset, cache)
    result = engine.explain_latents(ctx.run, cfg=cfg, model=ctx.model(), data=dataset,
                                    cache_dir=cache)
    spearman = {L: e["spearman"] for L, e in result.manifest["exactness"].items()}
    return {"latents": [r["latent"] for r in result.latents],
            "corpus_tokens": result.manifest["corpus"]["tokens"], "spearman": spearman}


def circuit(ctx: Context) -> dict[str, Any]:
    from latentaudit.circuit import trace_circuit
    from latentaudit.circuit.inputs import check_inputs
    from latentaudit.pipeline.stages import upstream_paths

    cfg, opts, dataset = ctx.cfg.circuit, ctx.cfg.circuit_options, dataset_path(ctx.cfg)
    ups = upstream_paths(ctx.cfg)
    if ctx.model.loaded is None:  # check before the model loads
        check_inputs(ctx.run, ups, opts.upstream_layer, cfg, sae=ctx.sae, data=dataset,
                     model_name=ctx.cfg.settings.model)
    result = trace_circuit(ctx.run, ups, cfg, upstream_layers=opts.upstream_layer,
                           model=ctx.model(), sae=ctx.sae, data=dataset,
                           cache_dir=ctx.cfg.explain_cache_dir)
    return {"hops": [{"upstream_layer": h.upstream_layer, "target_layer": h.target_layer,
                      "targets": h.targets, "edges_kept": int(h.keep.sum())}
                     for h in result.hops],
            "nodes": len(result.nodes), "edges": len(result.edges)}


def steer(ctx: Context) -> dict[str, Any]:
    from latentaudit.judges import JudgeSpec, load_rubric
    from latentaudit.steer import plan_steering, run_steering

    opts, s = ctx.cfg.steer_options, ctx.cfg.settings
    spec = opts.judge or ctx.cfg.judge.judge
    kind = JudgeSpec.parse(spec, load_rubric(s.rubric)).backend
    work = ctx.run / "steer"
    plan = ctx.plan_or_restart(lambda: plan_steering(
        ctx.cfg.steer, run=ctx.run, latents=list(opts.latents) or None,
        prompts=steer_prompts(ctx.cfg), rubric=s.rubric, judge=spec,
        coherence_judge=None if opts.coherence_judge == "none" else opts.coherence_judge,
        data=dataset_path(ctx.cfg), toward_model=opts.toward_model, base_model=opts.base_model,
        judge_options=_judge_options(spec, ctx) if kind in ("openai", "local") else {}),
        [work / rf.MANIFEST, work / rf.COMPLETIONS, work / "resid_norm.json"])
    result = run_steering(plan, ctx.model(), device=s.device, dtype=s.dtype)
    return {"prompts": len(plan.prompts), "held_out_from": plan.excluded_prompts,
            "sets": result.sets, "rows": len(result.rows),
            "summary": [{k: r.get(k) for k in ("method", "direction", "strength", "mean_diff",
                                               "beyond_null", "mean_logodds_change")}
                        for r in result.summary]}


def report(ctx: Context) -> dict[str, Any]:
    from latentaudit.report import write_report

    try:
        from latentaudit.report import require_packages

        require_packages()
    except LatentAuditError as err:  # the report extra is not installed: the run is complete
        raise StageSkipped(str(err).rstrip(".")) from None
    except ImportError:
        pass
    return {"path": str(Path(write_report(ctx.run)))}


STEPS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "sample": sample, "judge": judge, "pair": pair, "attribute": attribute, "explain": explain,
    "circuit": circuit, "steer": steer, "report": report}
