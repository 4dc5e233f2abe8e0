"""The run configuration: one TOML or YAML file → checked settings for every stage.

1. Parse the file (``tomllib`` / PyYAML), keeping the line of every key, so that each problem
   names ``file:line`` (or the key, where a line cannot be found).
2. Check the top-level keys and each section's keys against the allowed names; an unknown key
   is reported with the allowed ones and the closest match.
3. Check each value's type against the stage's dataclass field, then build the dataclass
   (:class:`~latentaudit.sample.SampleConfig`, :class:`~latentaudit.attribution.AttributionConfig`,
   :class:`~latentaudit.explain.ExplainConfig`, :class:`~latentaudit.steer.SteerConfig` and the
   small option classes below); a problem its own check finds is reported at the key.
4. Resolve relative paths from the config file's folder, so a config travels with its files.

Every problem of the file is collected and raised as one error. The option names are those of
the stage's dataclass, which are its command's flags in snake_case (``--max-new-tokens`` is
``max_new_tokens``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentaudit.errors import LatentAuditError
from latentaudit.pipeline.parse import Located, parse_file

ENTRIES = ("dataset", "judged", "completions", "prompts")
"""Where a run starts, latest stage first: a behaviour dataset skips sample, judge and pair;
judged completions skip sample and judge; completions skip sample; prompts run every stage."""


@dataclass
class RunSettings:
    """The top-level keys of a run config."""

    model: str
    """Model: an embedded short name, a local folder or a hub id."""
    sae: str = "default"
    """SAE path (any supported format), a shipped SAE's name, or default (the model's)."""
    layer: int | None = None
    """0-indexed layer the SAE reads (default: the layer its config records)."""
    out: str | None = None
    """The run folder (relative to the config file); `latentaudit run --out` wins over it."""
    prompts: str | None = None
    """Prompts to sample from: a suite name, a JSONL or .txt file. Steering uses them too (minus
    the prompts attribution saw) unless [steer] prompts is set."""
    completions: str | None = None
    """Start from these completions (JSONL as written by `latentaudit sample`): no sampling."""
    judged: str | None = None
    """Start from these judged completions (from `latentaudit judge`): no sampling or judging."""
    dataset: str | None = None
    """Start from this behaviour dataset (JSONL): no sampling, judging or pairing."""
    rubric: str = "false-belief"
    """Rubric of the judge, the pair stage and steering: a shipped name or a rubric JSON file."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps (not part of any fingerprint)."""
    dtype: str = "float32"
    """Model dtype: float32 or bfloat16."""
    notes: tuple[str, ...] = ()
    """Lines about this run for the report (e.g. why its sizes are small)."""


@dataclass
class JudgeOptions:
    """The [judge] section: the options of `latentaudit judge`."""

    judge: str = "auto"
    """rules[:FILE], probe[:FILE], local:MODEL, openai:MODEL, human:LABELS or auto (the rubric's
    shipped probe when it has one, else its rules)."""
    judge_model: str | None = None
    """probe judge: the local model it reads (default: the one it was trained on)."""
    batch_size: int | None = None
    """local / probe judge: sequences per forward pass (default 16 / 8)."""
    judge_base_url: str = "https://api.openai.com/v1"
    """openai judge: base URL of the OpenAI-compatible endpoint."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """openai judge: the environment variable holding the API key (never written anywhere)."""
    judge_workers: int = 8
    """openai judge: concurrent requests."""
    judge_timeout: float = 60.0
    """openai judge: seconds per request."""
    judge_retries: int = 5
    """openai judge: retries on 429 / 5xx / timeouts."""
    no_logprobs: bool = False
    """openai judge: read the text answer only."""
    allow_failures: bool = False
    """Go on when some completions could not be graded (they are left out); by default the run
    stops so that a rerun can retry them."""

    def __post_init__(self) -> None:
        for flag, value, low in (("--batch-size", self.batch_size, 1),
                                 ("--judge-workers", self.judge_workers, 1),
                                 ("--judge-retries", self.judge_retries, 0),
                                 ("--judge-timeout", self.judge_timeout, 1e-9)):
            if value is not None and value < low:
                raise LatentAuditError(f"{flag} must be at least {low:g}, got {value!r}.")


@dataclass
class PairOptions:
    """The [pair] section."""

    pairing: str = "all"
    """Pairs counted within a prompt: all (every positive×negative) or matched (one-to-one);
    attribution pairs by [attribute] pairing."""

    def __post_init__(self) -> None:
        if self.pairing not in ("all", "matched"):
            raise LatentAuditError(f"--pairing '{self.pairing}' is not one of all, matched.")


@dataclass
class SteerOptions:
    """The [steer] keys besides :class:`~latentaudit.steer.SteerConfig`'s."""

    judge: str | None = None
    """Judge of the steered completions (default: the [judge] section's)."""
    coherence_judge: str = "rules"
    """Judge of the rubric's 'coherent' question when the judge does not answer it (none: no
    incoherence measure)."""
    prompts: str | None = None
    """Prompts to steer on (default: the run's prompts, else the suite named like the rubric);
    the prompts attribution saw are left out."""
    latents: tuple[int, ...] = ()
    """Also steer these latent ids (the 'given' set)."""
    toward_model: str | None = None
    """Steer toward the behaviour on this model instead."""
    base_model: str | None = None
    """Base model of the model-diffing baseline (methods = [..., "model-diff"])."""


@dataclass
class RunConfig:
    """A checked run config (:func:`read_config`)."""

    source: Path | None
    """The config file (None when built in code)."""
    settings: RunSettings
    out: Path
    """The run folder, absolute."""
    entry: str
    """One of :data:`ENTRIES`: where the run starts."""
    sample: Any
    judge: JudgeOptions
    pair: PairOptions
    attribute: Any
    explain: Any | None
    """The ExplainConfig, or None when [explain] skip = true."""
    explain_cache_dir: str | None
    steer: Any | None
    """The SteerConfig, or None when [steer] skip = true."""
    steer_options: SteerOptions
    report: bool
    raw: dict[str, Any] = field(default_factory=dict)
    """The file's content as parsed."""
    located: Located | None = None
    """Where each key is in the file (for errors found later, by the input checks)."""

    def where(self, *keys: str) -> str:
        """``file:line: key`` of a key, for error messages."""
        return self.located.where(keys) if self.located else ".".join(keys)

    @property
    def entry_file(self) -> Path | None:
        value = getattr(self.settings, self.entry)
        return None if self.entry == "prompts" else Path(value)


def _sections() -> dict[str, tuple[type, ...]]:
    """Section name -> the dataclasses whose fields are its keys."""
    from latentaudit.attribution.config import AttributionConfig
    from latentaudit.explain.config import ExplainConfig
    from latentaudit.sample import SampleConfig
    from latentaudit.steer.config import SteerConfig

    return {"sample": (SampleConfig,), "judge": (JudgeOptions,), "pair": (PairOptions,),
            "attribute": (AttributionConfig,), "explain": (ExplainConfig,),
            "steer": (SteerConfig, SteerOptions), "report": ()}


EXTRA_KEYS = {"explain": {"skip": "bool", "cache_dir": "str | None"},
              "steer": {"skip": "bool"}, "report": {"skip": "bool"}}
"""Section keys of the pipeline itself: ``skip`` leaves an optional stage out."""


# ---- checking ----------------------------------------------------------------------------------

def _fits(value: Any, annotation: str) -> bool:
    """Whether ``value`` (as TOML / YAML gives it) fits a field annotation such as ``int | None``
    or ``tuple[float, ...]``."""
    for kind in (k.strip() for k in annotation.split("|")):
        if kind == "None" and value is None:
            return True
        if isinstance(value, bool):
            if kind == "bool":
                return True
            continue
        if (kind == "int" and isinstance(value, int)) or (kind == "float" and isinstance(
                value, (int, float))) or (kind == "str" and isinstance(value, str)):
            return True
        if kind.startswith("tuple[") and isinstance(value, list):
            inner = kind[len("tuple["):].split(",")[0].strip()
            if all(_fits(v, inner) for v in value):
                return True
    return False


def _describe(annotation: str) -> str:
    """``int | None`` -> "a whole number or left out"."""
    one = {"int": "a whole number", "float": "a number", "str": "a string",
           "bool": "true or false", "None": "left out"}
    many = {"int": "whole numbers", "float": "numbers", "str": "strings", "bool": "true/false"}
    kinds = []
    for kind in (k.strip() for k in annotation.split("|")):
        if kind.startswith("tuple["):
            inner = kind[len("tuple["):].split(",")[0].strip()
            kinds.append(f"a list of {many.get(inner, inner)}")
        else:
            kinds.append(one.get(kind, kind))
    return " or ".join(kinds)


def _allowed(section: str) -> dict[str, str]:
    """Key -> type annotation, for a section (or "" for the top level)."""
    if not section:
        return {f.name: str(f.type) for f in dataclasses.fields(RunSettings)}
    keys = {f.name: str(f.type) for cls in _sections()[section] for f in dataclasses.fields(cls)}
    return {**keys, **EXTRA_KEYS.get(section, {})}


def _unknown(keys: tuple[str, ...], allowed: dict[str, str], loc: Located) -> str:
    name = keys[-1]
    sections = [] if len(keys) > 1 else list(_sections())
    near = difflib.get_close_matches(name.replace("-", "_"), [*allowed, *sections], n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    where = f"[{keys[0]}] " if len(keys) > 1 else ""
    tail = f"; sections: {', '.join(f'[{s}]' for s in sections)}" if sections else ""
    return (f"{loc.where(keys)}: unknown key{hint}; {where}keys are: "
            f"{', '.join(sorted(allowed))}{tail}")


def _values(data: dict[str, Any], section: str, loc: Located, problems: list[str]
            ) -> dict[str, Any]:
    """The keys of one section (or the top level) whose values fit their fields."""
    allowed, good = _allowed(section), {}
    for key, value in data.items():
        keys = (section, key) if section else (key,)
        if key not in allowed:
            problems.append(_unknown(keys, allowed, loc))
        elif not _fits(value, allowed[key]):
            problems.append(f"{loc.where(keys)}: must be {_describe(allowed[key])}, got "
                            f"{value!r}")
        else:
            good[key] = tuple(value) if isinstance(value, list) else value
    return good


def _build(cls: type, values: dict[str, Any], section: str, loc: Located,
           problems: list[str]) -> Any:
    """``cls(**values)``; a problem its own check raises is reported at the key it names."""
    names = {f.name for f in dataclasses.fields(cls)}
    mine = {k: v for k, v in values.items() if k in names}
    try:
        return cls(**mine)
    except LatentAuditError as err:
        message = str(err)
        for key in sorted(mine, key=len, reverse=True):
            flag = "--" + key.replace("_", "-")
            if flag in message:
                problems.append(f"{loc.where((section, key))}: "
                                + message.replace(flag, key).rstrip("."))
                break
        else:
            problems.append(f"{loc.path}: [{section}] {message}")
        return None


def _resolve(value: str | None, base: Path) -> str | None:
    """A path relative to the config's folder; names (suites, models, rubrics) unchanged."""
    if value is None:
        return None
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    here = base / p
    looks_like_path = "/" in value or "\\" in value or p.suffix in (
        ".jsonl", ".json", ".txt", ".csv", ".safetensors", ".npz", ".pt")
    return str(here.resolve()) if here.exists() or looks_like_path else value


def _path(value: str, base: Path) -> str:
    """A path, absolute, relative to the config's folder."""
    return str((base / Path(value).expanduser()).resolve())


def _resolve_spec(spec: str | None, base: Path) -> str | None:
    """A judge spec with its file resolved (rules:FILE, human:FILE, probe:FILE)."""
    if spec is None or ":" not in spec:
        return spec
    kind, _, arg = spec.partition(":")
    return f"{kind}:{_resolve(arg, base)}" if kind in ("rules", "human", "probe") else spec


# ---- the whole file ----------------------------------------------------------------------------

def read_config(path: str | Path, *, out: str | Path | None = None) -> RunConfig:
    """Read and check a run config file; ``out`` (relative to the working folder) replaces its
    ``out`` key. Every problem of the file is raised as one error."""
    data, loc = parse_file(path)
    return build_config(data, loc, out=out)


def build_config(data: dict[str, Any], loc: Located, *, out: str | Path | None = None
                 ) -> RunConfig:
    """Check the parsed mapping ``data`` (step 2–4 of the module docstring)."""
    from latentaudit.attribution.config import AttributionConfig
    from latentaudit.explain.config import ExplainConfig
    from latentaudit.sample import SampleConfig
    from latentaudit.steer.config import SteerConfig

    problems: list[str] = []
    base = loc.path.parent.resolve()
    names = _sections()
    sections = {}
    for name in names:
        body = data.get(name, {})
        if not isinstance(body, dict):
            problems.append(f"{loc.where((name,))}: must be a section ([{name}] with keys)")
            body = {}
        sections[name] = _values(body, name, loc, problems)
    top = _values({k: v for k, v in data.items() if k not in names}, "", loc, problems)
    if "model" not in top and "model" not in data:
        problems.append(f"{loc.path}: key model is missing; add e.g. "
                        'model = "qwen2.5-0.5b-instruct"')
    for key in ("prompts", "rubric", "model", "sae"):  # a name, or a path
        top[key] = _resolve(top.get(key), base) if key in top else None
    for key in ("out", "completions", "judged", "dataset"):  # always a path
        top[key] = _path(top[key], base) if top.get(key) else None
    given = [e for e in ENTRIES[:3] if top.get(e)]
    if len(given) > 1:
        problems.append(f"{loc.where((given[1],))}: give one of {', '.join(ENTRIES[:3])} "
                        f"(where the run starts), not {' and '.join(given)}")
    entry = given[0] if given else "prompts"
    if not given and not top.get("prompts"):
        problems.append(f"{loc.path}: nothing to start from; give prompts (a suite name or "
                        "file), completions, judged or dataset")
    run_dir = Path(out).resolve() if out is not None else (
        Path(top["out"]) if top.get("out") else None)
    if run_dir is None:
        problems.append(f"{loc.path}: key out is missing; add out = \"runs/NAME\" (the run "
                        "folder) or pass --out")
    settings = RunSettings(**{k: v for k, v in top.items() if v is not None}) \
        if top.get("model") else None
    sec = sections
    built = {"sample": _build(SampleConfig, sec["sample"], "sample", loc, problems),
             "judge": _build(JudgeOptions, sec["judge"], "judge", loc, problems),
             "pair": _build(PairOptions, sec["pair"], "pair", loc, problems),
             "attribute": _build(AttributionConfig, sec["attribute"], "attribute", loc, problems),
             "steer_options": _build(SteerOptions, sec["steer"], "steer", loc, problems)}
    explain = None if sec["explain"].get("skip") else _build(ExplainConfig, _corpus(
        sec["explain"], base), "explain", loc, problems)
    steer = None if sec["steer"].get("skip") else _build(SteerConfig, sec["steer"], "steer",
                                                         loc, problems)
    if problems:
        head = f"{loc.path} has {len(problems)} problem(s); fix them and rerun:\n  " \
            if len(problems) > 1 else ""
        raise LatentAuditError(head + "\n  ".join(problems))
    judge, opts = built["judge"], built["steer_options"]
    judge.judge = _resolve_spec(judge.judge, base)
    opts.judge = _resolve_spec(opts.judge, base)
    opts.coherence_judge = _resolve_spec(opts.coherence_judge, base)
    opts.prompts = _resolve(opts.prompts, base)
    cache_dir = sec["explain"].get("cache_dir")
    return RunConfig(source=loc.path, settings=settings, out=run_dir.resolve(), entry=entry,
                     sample=built["sample"], judge=judge, pair=built["pair"],
                     attribute=built["attribute"], explain=explain,
                     explain_cache_dir=_path(cache_dir, base) if cache_dir else None,
                     steer=steer, steer_options=opts, report=not sec["report"].get("skip"),
                     raw=data, located=loc)


def _corpus(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """[explain] values with a corpus file resolved from the config's folder."""
    corpus = values.get("corpus")
    if isinstance(corpus, str) and corpus not in ("dataset", "held-out", "outside"):
        values = {**values, "corpus": _resolve(corpus, base)}
    return values
