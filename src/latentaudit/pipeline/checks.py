"""Every input of a run checked before any model loads, each problem named at its config key.

1. Device and dtype; the model (an embedded one must be installed, a folder must exist); the
   SAE (``default`` and shipped names resolved, the path must exist; its hook point and mean
   activation fit [attribute] hook and abar).
2. The rubric, and every judge spec the run will use (backend; rules and human-label files read
   and checked; a probe's file and rubric; an API judge's key variable set).
3. The entry file, read and validated as its stage will read it: prompts, completions (with the
   facts a fact-using rubric needs), judged completions, or a behaviour dataset with its pairs.
4. Steering's prompts and options; explain's reference text.
5. The circuit's upstream SAEs: each must exist, read a layer below the run's and have the run's
   SAE's d_model. With circuit or steer in the run, the SAE must read resid_post.

Problems are collected and raised as one error.
"""

from __future__ import annotations

import os
from pathlib import Path

from latentaudit.errors import LatentAuditError
from latentaudit.options import OptionError, config_key
from latentaudit.pipeline.config import RunConfig, _sections


def check_inputs(cfg: RunConfig) -> str:
    """Check everything (see the module docstring); returns the SAE's resolved path."""
    problems: list[str] = []
    s = cfg.settings

    def check(keys: tuple[str, ...], fn, *args):
        try:
            return fn(*args)
        except OptionError as err:  # names its field: reported at that key
            problems.append(f"{cfg.where(*option_key(keys, err))}: {err.named(config_key)}"
                            .rstrip("."))
        except LatentAuditError as err:
            problems.append(f"{cfg.where(*keys)}: {err}".rstrip("."))
        return None

    from latentaudit.judges.base import check_model_options

    check(("device",), check_model_options, s.device, s.dtype, 1)
    check(("model",), check_model, s.model)
    sae = check(("sae",), sae_path, s.sae, s.model)
    rubric = check(("rubric",), _rubric, s.rubric)
    if rubric is not None:
        if cfg.entry in ("prompts", "completions"):
            check(("judge", "judge"), check_judge, cfg.judge.judge, rubric, cfg.judge)
        if cfg.steer is not None and not cfg.steer.logodds_only:
            opts = cfg.steer_options
            check(("steer", "judge"), check_judge, opts.judge or cfg.judge.judge, rubric,
                  cfg.judge)
            if opts.coherence_judge not in (None, "none"):
                check(("steer", "coherence_judge"), check_judge, opts.coherence_judge, rubric,
                      cfg.judge)
    check((cfg.entry,), check_entry, cfg, rubric)
    if cfg.steer is not None:
        check(("steer",), check_steer, cfg, rubric)
    if cfg.explain is not None and cfg.explain.corpus != "dataset":
        from latentaudit.saes.evaluate import text_documents

        check(("explain", "corpus"), text_documents, cfg.explain.corpus)
    if sae is not None:
        check(("attribute",), check_attribution, sae, cfg.attribute)
    if cfg.circuit is not None and sae is not None:
        check(("circuit", "upstream_sae"), check_upstream, cfg, sae)
    if problems:
        head = f"{cfg.source} has {len(problems)} problem(s); fix them and rerun:\n  " \
            if len(problems) > 1 else ""
        raise LatentAuditError(head + "\n  ".join(problems))
    return sae


def check_model(name: str) -> None:
    """An embedded model must be installed (or cached); a path must exist; an adapter must
    fit its base model."""
    from latentaudit.models import embedded
    from latentaudit.models.adapters import check_adapter, parse_model_spec

    spec = parse_model_spec(name)
    check_adapter(spec)
    name = spec.base

    short = embedded.canonical(name)
    if short in embedded.EMBEDDED:
        if not (embedded.is_cached(short) or embedded.is_installed(short)):
            raise LatentAuditError(f"the embedded model '{name}' is not installed: "
                                   f"{embedded.get(short).install_hint}")
        return
    from latentaudit.models.load import resolve_model_path

    resolve_model_path(name)


def sae_path(value: str, model: str) -> str:
    from latentaudit.saes.shipped import resolve_sae_path

    path = resolve_sae_path(value, model)
    if not Path(path).exists():
        raise LatentAuditError(f"{path}: no such SAE file or folder; give its path, a shipped "
                               "SAE's name or default.")
    return path


def option_key(keys: tuple[str, ...], err: OptionError) -> tuple[str, ...]:
    """The key of the field an error of a check at ``keys`` names: in the same [section], or
    at the top level."""
    return (keys[0], err.field) if keys[0] in _sections() else (err.field,)


def check_attribution(sae: str, cfg) -> None:
    """The [attribute] hook and abar fit the SAE."""
    from latentaudit.attribution.plan import _load, check_sae_options

    check_sae_options(_load(sae), cfg)


def check_upstream(cfg: RunConfig, sae: str) -> None:
    """The [circuit] upstream SAEs: present, each at a layer below the run's, one d_model."""
    from latentaudit.attribution.plan import _load, saes_by_layer
    from latentaudit.circuit.inputs import upstream_saes

    paths = [sae_path(u, cfg.settings.model) for u in cfg.circuit_options.upstream_sae]
    run_sae = _load(sae)
    (layer, _), = saes_by_layer([run_sae], cfg.settings.layer, name=config_key).items()
    upstream_saes(paths, cfg.circuit_options.upstream_layer, layer, run_sae, name=config_key)


def _rubric(name: str):
    from latentaudit.judges import load_rubric

    return load_rubric(name)


def check_judge(spec: str, rubric, opts) -> None:
    """A judge spec the stage can build: its backend, files and keys (no model is loaded)."""
    from latentaudit.judges import JudgeSpec, make_judge

    parsed = JudgeSpec.parse(spec, rubric, flag="judge")
    kind, arg = parsed.backend, parsed.arg
    if kind in ("rules", "human"):
        make_judge(spec, rubric)  # reads and checks the rules or label file
    elif kind == "probe":
        from latentaudit.judges.probe import load_probe

        probe = load_probe(arg or rubric.name)
        if probe.rubric != rubric.name:
            raise LatentAuditError(f"judge '{spec}': the probe was trained for rubric "
                                   f"'{probe.rubric}', not '{rubric.name}'.")
    elif not arg:
        raise LatentAuditError(f"judge '{spec}': write {kind}:MODEL.")
    elif kind == "openai" and not os.environ.get(opts.judge_api_key_env):
        raise LatentAuditError(f"judge '{spec}' reads its API key from ${opts.judge_api_key_env}"
                               ", which is not set; set it or use another judge.")
    elif kind == "local":
        check_model(arg)


def check_entry(cfg: RunConfig, rubric) -> None:
    """Read the entry file as its stage will (problems listed with file:line)."""
    path = cfg.entry_file
    if cfg.entry == "prompts":
        from latentaudit.sample import read_prompts

        read_prompts(cfg.settings.prompts)
        return
    if not path.is_file():
        raise LatentAuditError(f"{path}: no such file.")
    if cfg.entry == "completions":
        from latentaudit.judges.run import items_from_rows, read_completions

        rows = read_completions(path)
        if rubric is not None:
            items_from_rows(rows, rubric, path)
    elif cfg.entry == "judged":
        from latentaudit.pair import read_judged

        read_judged(path)
    else:
        from latentaudit.data.behaviour import load_pairs

        load_pairs(path, cfg.attribute.pairing)


def check_steer(cfg: RunConfig, rubric) -> None:
    opts, steer = cfg.steer_options, cfg.steer
    if "model-diff" in steer.methods and not opts.base_model:
        raise LatentAuditError("methods has model-diff: give base_model (the model before the "
                               "change whose latents you diff).")
    if "given" in steer.methods and not opts.latents:
        raise LatentAuditError("methods has given: list the latent ids in latents.")
    for model in (opts.toward_model, opts.base_model):
        if model:
            check_model(model)
    source = opts.prompts or cfg.settings.prompts or (rubric.name if rubric else None)
    if source is not None:
        from latentaudit.sample import read_prompts

        read_prompts(source)


def steer_prompts(cfg: RunConfig) -> str:
    """The prompts steering draws from: [steer] prompts, else the run's, else the rubric's
    suite."""
    from latentaudit.judges import load_rubric

    opts, s = cfg.steer_options, cfg.settings
    return opts.prompts or s.prompts or load_rubric(s.rubric).name
