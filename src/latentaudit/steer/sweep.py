"""The steering sweep: prove or refute each latent by steering it (METHOD.md, "Checking causality
by steering").

1. Plan (no model loaded): read the attribution run, the SAE, the rubric, the judge spec and the
   prompts; keep the held-out prompts (never seen by attribution); refuse an output folder made
   with other sampling settings.
2. Load the model(s) and the SAE; measure r̄, the mean norm of the activation at the SAE's hook
   point (resid_post, resid_pre, attn_out or mlp_out of the layer) on the held-out prompts
   (stored in ``steer/resid_norm.json``, measured once). Steering adds α·d at that same point.
3. Latent sets per selection method and the conditions: each latent × direction × strength
   (and each whole set with ``joint``), plus the unsteered baseline per model.
4. Optional per-latent strength search: the ladder's strengths on the first ``search_n`` units;
   the largest strength whose incoherence ≤ ``max_incoherence`` is kept (else the smallest).
5. The first-token log-odds check for every condition (and the run's ranking) when the rubric
   declares a signature (:mod:`latentaudit.steer.logodds`).
6. Generation: every (condition, prompt, sample) row with the seed of (prompt, sample), so every
   condition shares the baseline's random numbers; rows of many conditions share a batch, each
   with its own steering vector. Rows are appended to ``steer/completions.jsonl`` and fsynced
   per batch: a killed sweep loses at most the batch in flight and a rerun skips what exists.
7. Grading through the judge cache, then the table (:mod:`latentaudit.steer.grade`), written
   as ``steering.jsonl``, ``steering_summary.json`` and figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentaudit import runfolder as rf
from latentaudit._io import write_json, write_jsonl
from latentaudit.attribution.plan import POINTS
from latentaudit.errors import LatentAuditError
from latentaudit.executor import as_executor
from latentaudit.judges.rubrics import Rubric, load_rubric
from latentaudit.options import OptionError
from latentaudit.runfolder import RunFolder, dataset_prompt_ids
from latentaudit.steer.config import Condition, SteerConfig
from latentaudit.steer.latents import latent_sets, read_run
from latentaudit.suites import SuitePrompt

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
WORK = rf.STEER_DIR
MATCHED = ("schema_version", "model", "toward_model", "sae", "layer", "hook", "scale",
           "temperature", "top_p", "max_new_tokens", "seed", "system")
ABSENT = {"hook": "resid_post"}
"""What a manifest written before a field existed meant by it."""


@dataclass
class SteerPlan:
    """Everything :func:`plan_steering` checked before a model loads."""

    cfg: SteerConfig
    out: Path
    model: str
    sae_path: str
    layer: int
    prompts: list[SuitePrompt]
    rubric: Rubric
    judge: str
    coherence_judge: str | None
    run: RunFolder | None = None
    given: list[int] | None = None
    toward_model: str | None = None
    base_model: str | None = None
    excluded_prompts: int = 0
    judge_options: dict[str, Any] = field(default_factory=dict)
    dataset: Path | None = None
    """The behaviour dataset the run attributed on (its prompts are held out)."""
    hook: str = "resid_post"
    """The hook point of ``layer`` steered (the SAE's)."""

    @property
    def work(self) -> Path:
        return self.out / WORK

    def settings(self) -> dict[str, Any]:
        canon = json.dumps([asdict(p) for p in self.prompts], sort_keys=True, ensure_ascii=False)
        c = self.cfg
        each = {p.prompt_id: hashlib.sha256(json.dumps(
            asdict(p), sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
            for p in self.prompts}
        return {"schema_version": SCHEMA_VERSION, "model": self.model,
                "toward_model": self.toward_model, "base_model": self.base_model,
                "sae": self.sae_path, "layer": self.layer, "hook": self.hook,
                "prompts_sha256": hashlib.sha256(canon.encode()).hexdigest(),
                "prompt_ids": [p.prompt_id for p in self.prompts], "prompt_sha256": each,
                "scale": c.scale,
                "temperature": c.temperature, "top_p": c.top_p,
                "max_new_tokens": c.max_new_tokens, "seed": c.seed, "system": c.system,
                "run": str(self.run.path) if self.run else None, "config": asdict(c),
                "rubric": self.rubric.name, "judge": self.judge,
                "coherence_judge": self.coherence_judge}


def plan_steering(cfg: SteerConfig, *, run: str | os.PathLike | None = None,
                  latents: list[int] | None = None, model: str | None = None,
                  sae: str | None = None, layer: int | None = None,
                  prompts: str | os.PathLike | list | None = None, rubric: str = "false-belief",
                  judge: str = "auto", coherence_judge: str | None = "rules",
                  out: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                  toward_model: str | None = None, base_model: str | None = None,
                  judge_options: dict[str, Any] | None = None, hook: str = "auto") -> SteerPlan:
    """Check every input of a sweep (step 1 of the module docstring)."""
    from latentaudit.judges import JudgeSpec
    from latentaudit.saes.shipped import resolve_sae_path
    from latentaudit.sample import read_prompts

    info = read_run(run) if run is not None else None
    if info is None and not latents:
        raise LatentAuditError("give --from RUN_DIR (an attribution run) or --latents IDS.")
    model = model or (info.model_name if info else None)
    if model is None:
        raise LatentAuditError("--model is needed when there is no --from run.")
    if "model-diff" in cfg.methods and base_model is None:
        raise LatentAuditError("--methods model-diff needs --base-model (the model before the "
                               "change whose latents you diff).")
    rub = load_rubric(rubric)
    for spec in (judge, coherence_judge):
        if spec is not None:
            JudgeSpec.parse(spec, rub)
    sae_path = resolve_sae_path(sae, model) if sae else (
        info.sae_path(info.layers[0]) if info else None)
    if sae_path is None:
        raise LatentAuditError("--sae is needed when there is no --from run.")
    layer = layer if layer is not None else (info.layers[0] if info else None)
    recorded, hook = _sae_site(sae_path, hook)
    if layer is None and recorded is None:
        raise LatentAuditError(f"--sae {sae_path}: the SAE does not record its layer; pass "
                               "--layer.")
    layer = recorded if layer is None else layer
    source = prompts if prompts is not None else rub.name
    all_prompts = read_prompts(source)
    used: set[str] = set()
    dataset = Path(data) if data else (info.dataset_file() if info else None)
    if info is not None:
        if dataset is None or not dataset.is_file():
            raise LatentAuditError(
                f"{info.path}/manifest.json: field 'dataset.path' names "
                f"{dataset or info.dataset_path or 'no file'}, which is not here; pass --data "
                "with the dataset the run was made from, so its prompts are left out of steering.")
        used = dataset_prompt_ids(dataset)
    held = [p for p in all_prompts if p.prompt_id not in used]
    n_used = len(all_prompts) - len(held)
    if cfg.max_prompts:
        held = held[:cfg.max_prompts]
    if not held:
        raise LatentAuditError(f"--prompts {source}: every prompt was used for attribution; "
                               "give prompts the run did not see.")
    out = Path(out) if out is not None else (info.path if info else None)
    if out is None:
        raise LatentAuditError("--out is needed when there is no --from run.")
    plan = SteerPlan(cfg=cfg, out=out, model=model, sae_path=str(sae_path), layer=int(layer),
                     prompts=held, rubric=rub, judge=judge, coherence_judge=coherence_judge,
                     run=info, given=latents, toward_model=toward_model, base_model=base_model,
                     excluded_prompts=n_used, dataset=dataset if info is not None else None,
                     judge_options=judge_options or {}, hook=hook)
    _check_previous(plan)
    return plan


def _sae_site(path: str, hook: str = "auto") -> tuple[int | None, str]:
    """(layer, hook point) the SAE records; ``hook`` other than auto must be its hook point."""
    from latentaudit.saes import load_sae

    sae = load_sae(path)
    if sae.info.hook not in POINTS:
        raise LatentAuditError(
            f"--sae {path} reads the hook point {sae.info.hook}, where latentaudit does not "
            f"steer: use an SAE trained at one of {', '.join(POINTS)}.")
    if hook not in ("auto", sae.info.hook):
        raise LatentAuditError(
            f"--sae {path} reads the hook point {sae.info.hook} but --hook {hook} was given: "
            f"pass --hook {sae.info.hook} (or auto), or an SAE trained at {hook}.")
    return sae.info.layer, sae.info.hook


def _check_previous(plan: SteerPlan) -> None:
    mpath = plan.work / rf.MANIFEST
    if not mpath.is_file():
        return
    try:
        old = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LatentAuditError(f"{mpath}:{err.lineno}: not valid JSON; move {plan.work} away to "
                               "start the sweep again.") from None
    new = plan.settings()
    for key in MATCHED:
        if old.get(key, ABSENT.get(key)) != new[key]:
            raise LatentAuditError(
                f"{mpath}: the completions there were made with {key}={old.get(key)!r}, this "
                f"sweep has {key}={new[key]!r}; use the same settings or another --out.")
    # the prompt set may change (a row depends on its own prompt only), a prompt's text may not
    old_each = old.get("prompt_sha256") or {}
    changed = [pid for pid, h in new["prompt_sha256"].items() if old_each.get(pid, h) != h]
    if changed:
        raise LatentAuditError(
            f"{mpath}: prompt {changed[0]!r} has other text than when its completions were made; "
            "use another --out.")


# ---- the driver --------------------------------------------------------------------------------

@dataclass
class SteerResult:
    """What a sweep wrote (the same content as its files)."""

    rows: list[dict[str, Any]]
    """``steering.jsonl``: one row per condition (the fields of
    :class:`~latentaudit.runfolder.SteeringRow`)."""
    summary: list[dict[str, Any]]
    """``steering_summary.json``: per method, direction and strength."""
    logodds: list[dict[str, Any]]
    """``steering_logodds.jsonl``: the first-token check per steered latent set."""
    sets: dict[str, list[int]]
    resid_norm: float | None
    out: Path
    figures: list[Path]


def run_steering(plan: SteerPlan, model=None, *, device: str = "auto", dtype: str = "float32",
                 engine=None) -> SteerResult:
    """Run a planned sweep (steps 2–7 of the module docstring); ``model`` may be loaded already.

    engine: an :class:`~latentaudit.executor.Executor` (or its ``EngineConfig``); with
    ``--engine ray`` the steered completions (step 6, and the search's trials) are generated on
    Ray workers.
    """
    executor = as_executor(engine)
    if not executor.distributed:
        return _run_steering(plan, model, device=device, dtype=dtype)
    with executor.steered_rows(device, dtype) as remote:
        return _run_steering(plan, model, device=device, dtype=dtype, remote=remote)


def _run_steering(plan: SteerPlan, model=None, *, device: str = "auto", dtype: str = "float32",
                  remote=None) -> SteerResult:
    from latentaudit.models.load import load_model
    from latentaudit.saes import load_sae
    from latentaudit.steer import figures, logodds, search
    from latentaudit.steer.generation import Context, generate_missing, grade, read_rows
    from latentaudit.steer.grade import condition_table, summarise

    cfg = plan.cfg
    loaded = model if model is not None else load_model(plan.model, device=device, dtype=dtype)
    models = {"main": loaded}
    if plan.toward_model:
        models["toward"] = load_model(plan.toward_model, device=device, dtype=dtype)
    sae = load_sae(plan.sae_path, dtype=torch.float32, layer=plan.layer, hook=plan.hook)
    for m in models.values():
        sae.check_fits(m.d_model, plan.layer, m.name)
    dirs = sae.decoder_directions()  # (d_sae, d_model) unit rows
    plan.work.mkdir(parents=True, exist_ok=True)
    write_json(plan.work / rf.MANIFEST, plan.settings())
    scfg = _sample_config(cfg)
    enc = {k: _encode_all(m, plan, scfg) for k, m in models.items()}
    rbar = _resid_norm(plan, loaded, enc["main"]) if cfg.scale == "relative" else None
    diff = None
    if plan.base_model:
        from latentaudit.steer.diff import model_diff

        diff = model_diff(plan, loaded, sae, device=device, dtype=dtype)
    sets = latent_sets(plan.run, cfg.methods, cfg.top_k, cfg.random_seed, sae.d_sae, plan.given,
                       diff)
    units = [(p.prompt_id, i) for p in plan.prompts for i in range(cfg.n)]
    ctx = Context(plan=plan, models=models, enc=enc, dirs=dirs, rbar=rbar, scfg=scfg,
                         path=plan.work / rf.COMPLETIONS, remote=remote)
    conds = make_conditions(sets, cfg, rbar, "toward" in models)
    if cfg.search:
        conds = search.search_strengths(ctx, conds, units)
    lo_rows = []
    if cfg.logodds and plan.rubric.first_token:
        path = plan.out / rf.STEERING_LOGODDS
        lo_rows = logodds.check(ctx, conds, _ranking_latents(plan), _read_jsonl(path))
        write_jsonl(path, lo_rows)
    if cfg.logodds_only:
        if not lo_rows:
            raise OptionError("logodds_only", f"{{}}: the rubric '{plan.rubric.name}' declares "
                                              "no first_token signature.")
        return SteerResult(rows=[], summary=[], logodds=lo_rows, sets=sets, resid_norm=rbar,
                           out=plan.out, figures=[])
    generate_missing(ctx, conds, units)
    rows = read_rows(ctx.path)
    keys, wanted = {c.key for c in conds}, set(units)
    graded = grade(ctx, [row for k, row in rows.items()
                         if k[0] in keys and (k[1], k[2]) in wanted])
    write_jsonl(plan.work / rf.JUDGED, graded.values())
    table = condition_table(conds, graded, units, cfg, {r["key"]: r for r in lo_rows})
    summary = summarise(table, cfg.n_boot, cfg.seed, cfg.level)
    table_rows = [r.to_dict() for r in table]
    write_jsonl(plan.out / rf.STEERING, table_rows)
    write_json(plan.out / rf.STEERING_SUMMARY,
               {"schema_version": SCHEMA_VERSION, "resid_norm": rbar, "sets": sets,
                "prompts": len(plan.prompts), "units": len(units), "summary": summary})
    figs = figures.plot_sweep(table, plan.out)
    return SteerResult(rows=table_rows, summary=summary, logodds=lo_rows, sets=sets,
                       resid_norm=rbar, out=plan.out, figures=figs)


def make_conditions(sets: dict[str, list[int]], cfg: SteerConfig, rbar: float | None,
                    toward_model: bool) -> list[Condition]:
    """The baseline(s) and each latent (and, with ``joint``, each set) × direction × strength."""
    conds = [Condition("base")]
    if toward_model and "toward" in cfg.directions:
        conds.append(Condition("base", model="toward"))
    for method, ids in sets.items():
        groups = [(i,) for i in ids] + ([tuple(ids)] if cfg.joint and len(ids) > 1 else [])
        for latents in groups:
            for direction in cfg.directions:
                model = "toward" if direction == "toward" and toward_model else "main"
                for s in cfg.strengths:
                    sign = -1.0 if direction == "away" else 1.0
                    alpha = sign * s * (rbar if rbar is not None else 1.0)
                    conds.append(Condition(method, latents, direction, s, alpha, model))
    return conds


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier output (none when absent or unreadable: it is then recomputed)."""
    try:
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
    except (OSError, ValueError):
        return []


def _ranking_latents(plan: SteerPlan) -> list[int]:
    if plan.run is None or not plan.cfg.logodds_top:
        return []
    rows = [r for r in plan.run.ranking if int(r.get("layer", plan.layer)) == plan.layer]
    return [int(r["latent"]) for r in rows[:plan.cfg.logodds_top]]


def _sample_config(cfg: SteerConfig):
    from latentaudit.sample import SampleConfig

    return SampleConfig(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                        batch_size=cfg.batch_size, system=cfg.system)


def _encode_all(loaded, plan: SteerPlan, scfg) -> dict[str, list[int]]:
    from latentaudit.sample import encode_row_prompt

    return {p.prompt_id: encode_row_prompt(loaded, p, scfg) for p in plan.prompts}


def _resid_norm(plan: SteerPlan, loaded, enc: dict[str, list[int]]) -> float:
    """r̄ on the held-out prompts, measured once and stored in ``steer/resid_norm.json``."""
    from latentaudit.models.norm import mean_resid_norm

    path = plan.work / "resid_norm.json"
    if path.is_file():
        return float(json.loads(path.read_text(encoding="utf-8"))["resid_norm"])
    seqs = list(enc.values())
    value = mean_resid_norm(loaded, plan.layer, seqs, batch_size=plan.cfg.forward_batch,
                            point=plan.hook)
    write_json(path, {"resid_norm": value, "model": plan.model, "layer": plan.layer,
                      "hook": plan.hook,
                      "text": "held-out prompts (chat template), first position left out",
                      "sequences": len(seqs), "tokens": sum(len(s) - 1 for s in seqs)})
    log.info("mean norm at %s of layer %d: %.3f", plan.hook, plan.layer, value)
    return value
