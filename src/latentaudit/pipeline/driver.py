"""The pipeline: sample → judge → pair → attribute → explain → circuit → steer → report, in one run
folder (circuit only when the config has a [circuit] section).

1. Read and check the config (:mod:`.config`), then every input it names (:mod:`.checks`),
   before any model loads.
2. Fingerprint each stage (:mod:`.records`): sha256 of its effective config, the fingerprints of
   the stages it reads (:data:`.stages.STAGES`) and the sha256 of the outside files it reads.
   A stage whose output the config gives as a file (``completions``, ``judged``, ``dataset``) is
   *given*: its fingerprint is that file's; the stages before it are *unused*.
3. Decide each stage against ``RUN/pipeline.json``: done with the same fingerprint and its files
   present → skip; partial with the same fingerprint → resume, by the stage's own mechanism
   (:mod:`.steps`); anything else → run again from the start (its old results removed, content-
   keyed caches kept). Fingerprints chain, so a change reruns the stage it touches and every
   stage that reads it, and no other.
4. Run the stages in order. The model loads once, when the first stage that needs it starts.
   The record is written, atomically, when a stage starts (partial) and when it ends (done), so
   a run killed anywhere resumes from there. What a stage freed is handed back before the next
   one starts (:func:`~latentaudit.batching.release_memory`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latentaudit.errors import LatentAuditError
from latentaudit.options import OptionError, config_key
from latentaudit.pipeline import steps
from latentaudit.pipeline.checks import check_inputs, option_key
from latentaudit.pipeline.config import RunConfig, read_config
from latentaudit.pipeline.records import (
    Record,
    StageRecord,
    digest,
    fingerprint,
    now,
    read_record,
    run_lock,
)
from latentaudit.pipeline.stages import ORDER, STAGES, given_stage

log = logging.getLogger(__name__)

ACTIONS = ("run", "resume", "skip", "given", "unused", "off")


@dataclass
class StagePlan:
    """What the pipeline does with one stage."""

    name: str
    action: str
    """run (from the start), resume (finish a partial run), skip (done, nothing changed),
    given (its output is a file of the config), unused (before the entry point), off (left out
    by the config)."""
    why: str
    fingerprint: str | None = None
    reads: dict[str, str | None] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str | None] = field(default_factory=dict)


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` did."""

    run: Path
    plans: list[StagePlan]
    record: Record
    """The content of ``RUN/pipeline.json``."""
    report: Path | None
    """The HTML report, when the report stage made one."""
    notes: list[str]


def _downstream(names: set[str]) -> set[str]:
    """``names`` and every stage that reads one of them, directly or not."""
    out = set(names)
    for name in ORDER:
        if any(r in out for r in STAGES[name].reads):
            out.add(name)
    return out


def _changed(old: StageRecord, plan: StagePlan) -> str:
    """Which keys of a stage's fingerprint changed, in words."""
    what = [f"{plan.name}.{k}" for k in sorted(set(old.config) | set(plan.config))
            if old.config.get(k) != plan.config.get(k)]
    what += [f"{k} (a stage it reads)" for k in plan.reads if old.reads.get(k) != plan.reads[k]]
    what += [f"the {k} file" for k in plan.inputs if old.inputs.get(k) != plan.inputs[k]]
    return "changed: " + (", ".join(what) if what else "its inputs")


def _outputs_present(cfg: RunConfig, name: str, old: StageRecord) -> bool:
    if name == "report":
        return bool(old.summary.get("path")) and Path(old.summary["path"]).exists()
    return all((cfg.out / f).exists() for f in STAGES[name].outputs(cfg))


def _off(cfg: RunConfig, name: str) -> str | None:
    """Why the config leaves stage ``name`` out (None when it runs)."""
    if (name == "explain" and cfg.explain is None) or (name == "steer" and cfg.steer is None) \
            or (name == "circuit" and cfg.circuit is None) \
            or (name == "report" and not cfg.report):
        return f"left out by the config ([{name}] skip = true)"
    return None


def plan_stages(cfg: RunConfig, sae: str, record: Record, redo: tuple[str, ...] = ()
                ) -> list[StagePlan]:
    """Steps 2 and 3 of the module docstring."""
    given = given_stage(cfg)
    first = ORDER.index(given) if given else -1
    forced = _downstream(set(redo))
    fps: dict[str, str | None] = {}
    plans = []
    for i, name in enumerate(ORDER):
        if name == "circuit" and cfg.circuit_options is None:
            continue  # no [circuit] section: the run has no circuit stage
        if i < first:
            plan = StagePlan(name, "unused", f"the run starts from {cfg.entry} {cfg.entry_file}")
        elif i == first:
            inputs = {"file": digest(cfg.entry_file)}  # by content: the run folder may move
            plan = StagePlan(name, "given", f"{cfg.entry} = {cfg.entry_file}",
                             fingerprint(name, {"given": cfg.entry}, {}, inputs),
                             config={"given": cfg.entry}, inputs=inputs)
        elif why := _off(cfg, name):
            plan = StagePlan(name, "off", why)
        else:
            config, inputs = STAGES[name].spec(cfg, sae)
            reads = {r: fps[r] for r in STAGES[name].reads if r in fps}  # a stage the run
            # lacks (circuit without a [circuit] section) is not read
            plan = StagePlan(name, "run", "", fingerprint(name, config, reads, inputs), reads,
                             config, inputs)
            old = record.stages.get(name)
            same = old is not None and old.fingerprint == plan.fingerprint
            if name in forced:
                plan.why = "asked to redo"
            elif old is None or old.fingerprint is None:
                plan.why = "not run yet"
            elif not same:
                plan.why = _changed(old, plan)
            elif old.status == "partial":
                plan.action, plan.why = "resume", "interrupted: resuming"
            elif old.status == "done":
                if _outputs_present(cfg, name, old):
                    plan.action, plan.why = "skip", "done, nothing changed"
                else:
                    plan.why = "its files are missing"
            else:
                plan.why = f"{old.status} last time ({old.reason})"
        fps[name] = plan.fingerprint
        plans.append(plan)
    return plans


def _notes(cfg: RunConfig, plans: list[StagePlan]) -> list[str]:
    notes = list(cfg.settings.notes)
    unused = [p.name for p in plans if p.action in ("unused", "given")]
    if unused:
        notes.append(f"The run starts from {cfg.entry} given as a file ({cfg.entry_file.name}): "
                     f"{', '.join(unused)} did not run here.")
    notes += [f"{p.name}: {p.why}." for p in plans if p.action == "off"]
    return notes


def run_pipeline(config: RunConfig | str | Path, *, out: str | Path | None = None,
                 redo: tuple[str, ...] = (), dry_run: bool = False) -> PipelineResult:
    """Run (or resume) every stage of a run config into its run folder; see the module
    docstring. ``out`` replaces the config's run folder; ``redo`` names stages to run again
    from the start (with every stage that reads them); ``dry_run`` checks and plans only."""
    cfg = config if isinstance(config, RunConfig) else read_config(config, out=out)
    bad = [r for r in redo if r not in ORDER]
    if bad:
        raise LatentAuditError(f"--redo {', '.join(bad)}: stages are {', '.join(ORDER)}.")
    sae = check_inputs(cfg)
    record = read_record(cfg.out)
    plans = plan_stages(cfg, sae, record, tuple(redo))
    notes = _notes(cfg, plans)
    result = PipelineResult(cfg.out, plans, record, None, notes)
    if dry_run:
        return result
    record.meta = {"config": str(cfg.source) if cfg.source else None,
                   "config_sha256": digest(cfg.source) if cfg.source else None,
                   "entry": cfg.entry, "model": cfg.settings.model, "sae": sae,
                   "settings": asdict(cfg.settings), "notes": notes}
    for p in plans:
        if p.action in ("unused", "given", "off"):
            record.stages[p.name] = StageRecord(p.action if p.action != "off" else "skipped",
                                                p.fingerprint, config=p.config, inputs=p.inputs,
                                                reason=p.why)
    cfg.out.mkdir(parents=True, exist_ok=True)
    with run_lock(cfg.out):
        record.save()
        models = steps.Models(cfg)
        for p in plans:
            if p.action in ("run", "resume"):
                _execute(cfg, sae, p, record, models)
            else:
                log.info("stage %s: %s (%s)", p.name, p.action, p.why)
    result.notes = record.meta["notes"]
    report = record.stages.get("report")
    if report is not None and report.status == "done":
        result.report = Path(report.summary["path"])
    return result


def _execute(cfg: RunConfig, sae: str, plan: StagePlan, record: Record,
             models: steps.Models) -> None:
    """Run one stage, recording it as partial first and as done when it returns."""
    old = record.stages.get(plan.name)
    if plan.action == "run":
        for f in STAGES[plan.name].clean:
            (cfg.out / f).unlink(missing_ok=True)
    rec = StageRecord("partial", plan.fingerprint, plan.reads, plan.config, plan.inputs,
                      started=now(),
                      seconds=old.seconds if old is not None and plan.action == "resume" else 0.0)
    record.stages[plan.name] = rec
    record.save()
    log.info("stage %s: %s (%s)", plan.name, plan.action, plan.why)
    start = time.perf_counter()
    try:
        ctx = steps.Context(cfg, sae, models, fresh=plan.action == "run")
        loaded = models.loaded is not None
        rec.summary = steps.STEPS[plan.name](ctx)
        if not loaded and models.loaded is not None:
            rec.summary["model_load_seconds"] = round(models.seconds, 1)
        rec.status, rec.finished = "done", now()
        rec.outputs = STAGES[plan.name].outputs(cfg) or [rec.summary.get("path", "")]
    except OptionError as err:  # a stage's check of an option: named by the option's key
        raise LatentAuditError(f"{cfg.where(*option_key((plan.name,), err))}: "
                               f"{err.named(config_key)}") from None
    except steps.StageSkipped as why:
        rec.status, rec.reason = "skipped", str(why)
        record.meta["notes"] = [*record.meta.get("notes", []), f"{plan.name}: {why}."]
        log.info("stage %s skipped: %s", plan.name, why)
    finally:
        rec.seconds += time.perf_counter() - start
        record.save()
        if "torch" in sys.modules:  # a stage that ran torch: hand back what it freed
            from latentaudit.batching import release_memory

            release_memory()
