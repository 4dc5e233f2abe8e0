"""The stages of a run: what each reads, what its fingerprint covers, what it writes.

The run folder's files (their names, who writes and who reads each) are defined once in
:mod:`latentaudit.runfolder`; each is written by its stage's own module, atomically.

A stage started again after a change of its fingerprint first removes its ``clean`` files;
caches keyed by content stay (the judge cache, explain's example cache, the attribution
checkpoint). Sampling and steering keep their completions when their own manifests accept the
new settings (e.g. more samples, other steering strengths), and start again otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentaudit import runfolder as rf
from latentaudit.pipeline.checks import steer_prompts
from latentaudit.pipeline.config import RunConfig
from latentaudit.pipeline.records import digest, effective

ORDER = ("sample", "judge", "pair", "attribute", "explain", "circuit", "steer", "report")


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    name: str
    reads: tuple[str, ...]
    """Stages whose results it reads: a change of their fingerprints changes its own."""
    spec: Callable[[RunConfig, str], tuple[dict[str, Any], dict[str, str | None]]]
    """(effective config, {outside input: sha256}) from the config and the SAE path."""
    outputs: Callable[[RunConfig], list[str]]
    """Files that must be there for the stage to count as done."""
    clean: tuple[str, ...] = ()
    """Files removed when the stage starts again."""


# ---- where the run's files are -----------------------------------------------------------------

def completions_path(cfg: RunConfig) -> Path:
    return cfg.entry_file if cfg.entry == "completions" else cfg.out / rf.COMPLETIONS


def judged_path(cfg: RunConfig) -> Path:
    return cfg.entry_file if cfg.entry == "judged" else cfg.out / rf.JUDGED


def dataset_path(cfg: RunConfig) -> Path:
    return cfg.entry_file if cfg.entry == "dataset" else cfg.out / rf.DATASET


def given_stage(cfg: RunConfig) -> str | None:
    """The stage whose output the config gives as a file (None when the run starts from
    prompts)."""
    return {"completions": "sample", "judged": "judge", "dataset": "pair"}.get(cfg.entry)


# ---- fingerprints ------------------------------------------------------------------------------

def prompts_digest(source: str) -> str:
    """sha256 of the prompts as read (a suite's content, or a file's rows)."""
    from latentaudit.sample import read_prompts

    rows = [dataclasses.asdict(p) for p in read_prompts(source)]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()
                          ).hexdigest()


def rubric_digest(name: str) -> str:
    """sha256 of every file the rubric is read from (JSON, templates, rules)."""
    from latentaudit.judges import load_rubric

    h = hashlib.sha256()
    for f in sorted(load_rubric(name).files):
        h.update(f"{Path(f).name}\0{digest(f)}\0".encode())
    return h.hexdigest()


def judge_spec(spec: str, cfg: RunConfig) -> dict[str, Any]:
    """A judge as it enters a fingerprint: the resolved spec, its file and model options."""
    from latentaudit.judges import JudgeSpec, load_rubric

    s = JudgeSpec.parse(spec, load_rubric(cfg.settings.rubric))
    file = digest(s.arg) if s.arg else None  # a file enters by its content, a model by its name
    out: dict[str, Any] = {"spec": f"{s.backend}:<file>" if file else str(s), "file": file}
    if s.backend in ("probe", "local"):
        out.update(dtype=cfg.settings.dtype, judge_model=cfg.judge.judge_model)
    if s.backend == "openai":
        out.update(base_url=cfg.judge.judge_base_url, logprobs=not cfg.judge.no_logprobs)
    return out


def _sample(cfg: RunConfig, sae: str):
    s = cfg.settings
    return ({"model": s.model, "dtype": s.dtype, **effective(cfg.sample)},
            {"prompts": prompts_digest(s.prompts)})


def rubric_name(cfg: RunConfig) -> str:
    from latentaudit.judges import load_rubric

    return load_rubric(cfg.settings.rubric).name


def _judge(cfg: RunConfig, sae: str):
    return ({"judge": judge_spec(cfg.judge.judge, cfg), "rubric": rubric_name(cfg),
             "allow_failures": cfg.judge.allow_failures},
            {"rubric": rubric_digest(cfg.settings.rubric)})


def _pair(cfg: RunConfig, sae: str):
    return ({**effective(cfg.pair), "rubric": rubric_name(cfg)},
            {"rubric": rubric_digest(cfg.settings.rubric)})


def _attribute(cfg: RunConfig, sae: str):
    s = cfg.settings
    return ({"model": s.model, "dtype": s.dtype, "layer": s.layer, **effective(cfg.attribute)},
            {"sae": digest(sae)})


def _explain(cfg: RunConfig, sae: str):
    config, corpus = effective(cfg.explain), cfg.explain.corpus
    file = digest(corpus) if corpus != "dataset" else None
    if file:
        config["corpus"] = "<file>"
    return config, {"corpus": file}


def upstream_paths(cfg: RunConfig) -> list[str]:
    """The [circuit] upstream SAEs' resolved paths (shipped names resolved for the run's model)."""
    from latentaudit.saes.shipped import resolve_sae_path

    return [resolve_sae_path(u, cfg.settings.model) for u in cfg.circuit_options.upstream_sae]


def _circuit(cfg: RunConfig, sae: str):
    s, opts = cfg.settings, cfg.circuit_options
    config = {k: v for k, v in effective(cfg.circuit).items() if k not in ("target_batch",)}
    layers = opts.upstream_layer
    config.update(model=s.model, dtype=s.dtype,
                  upstream_layer=list(layers) if isinstance(layers, tuple) else layers)
    return config, {f"upstream_sae_{i}": digest(p) for i, p in enumerate(upstream_paths(cfg))}


def _steer(cfg: RunConfig, sae: str):
    opts = cfg.steer_options
    judge = opts.judge or cfg.judge.judge
    coherence = opts.coherence_judge if opts.coherence_judge != "none" else None
    config = {**effective(cfg.steer), "judge": judge_spec(judge, cfg),
              "coherence_judge": judge_spec(coherence, cfg) if coherence else None,
              "latents": list(opts.latents), "toward_model": opts.toward_model,
              "base_model": opts.base_model, "rubric": rubric_name(cfg)}
    source = steer_prompts(cfg)
    return config, {"prompts": prompts_digest(source),
                    "rubric": rubric_digest(cfg.settings.rubric)}


def _report(cfg: RunConfig, sae: str):
    return {}, {}


def _steer_outputs(cfg: RunConfig) -> list[str]:
    return [rf.STEERING_LOGODDS if cfg.steer.logodds_only else rf.STEERING_SUMMARY]


STAGES = {
    "sample": Stage("sample", (), _sample, lambda cfg: [rf.COMPLETIONS]),
    "judge": Stage("judge", ("sample",), _judge, lambda cfg: [rf.JUDGED], (rf.JUDGED,)),
    "pair": Stage("pair", ("judge",), _pair, lambda cfg: [rf.DATASET], (rf.DATASET,)),
    "attribute": Stage("attribute", ("pair",), _attribute, lambda cfg: list(rf.ATTRIBUTE_FILES),
                       rf.ATTRIBUTE_FILES),
    "explain": Stage("explain", ("attribute",), _explain, lambda cfg: list(rf.EXPLAIN_DONE),
                     rf.EXPLAIN_FILES),
    "circuit": Stage("circuit", ("attribute", "explain"), _circuit,
                     lambda cfg: list(rf.CIRCUIT_FILES), rf.CIRCUIT_FILES),
    "steer": Stage("steer", ("attribute",), _steer, _steer_outputs, rf.STEER_FILES),
    "report": Stage("report", ("sample", "judge", "pair", "attribute", "explain", "circuit",
                               "steer"),
                    _report, lambda cfg: [], (rf.REPORT,)),
}
