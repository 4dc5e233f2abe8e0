"""The run configuration: one TOML or YAML file → checked settings for every stage.

1. Parse the file (``tomllib`` / PyYAML), keeping the line of every key, so that each problem
   names ``file:line`` (or the key, where a line cannot be found).
2. Check the top-level keys and each section's keys against the allowed names; an unknown key
   is reported with the allowed ones and the closest match.
3. Check each value's type against the stage's dataclass field, then build the dataclass
   (:class:`~latentaudit.sample.SampleConfig`, :class:`~latentaudit.attribution.AttributionConfig`,
   :class:`~latentaudit.explain.ExplainConfig`, :class:`~latentaudit.circuit.CircuitConfig`,
   :class:`~latentaudit.steer.SteerConfig` and the small option classes below); a problem its
   own check finds is reported at the key.
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
from latentaudit.options import OptionError, config_key
from latentaudit.pipeline.options import (
    CircuitOptions,
    JudgeOptions,
    PairOptions,
    RunSettings,
    SteerOptions,
)
from latentaudit.pipeline.parse import Located, parse_file

ENTRIES = ("dataset", "judged", "completions", "prompts")
"""Where a run starts, latest stage first: a behaviour dataset skips sample, judge and pair;
judged completions skip sample and judge; completions skip sample; prompts run every stage."""


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
    circuit: Any | None = None
    """The CircuitConfig, or None when the config has no [circuit] section or [circuit] skip =
    true."""
    circuit_options: CircuitOptions | None = None
    """The [circuit] section's upstream SAEs and layers (None when the config has no [circuit]
    section: the run has no circuit stage)."""

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
    from latentaudit.circuit.config import CircuitConfig
    from latentaudit.explain.config import ExplainConfig
    from latentaudit.sample import SampleConfig
    from latentaudit.steer.config import SteerConfig

    return {"sample": (SampleConfig,), "judge": (JudgeOptions,), "pair": (PairOptions,),
            "attribute": (AttributionConfig,), "explain": (ExplainConfig,),
            "circuit": (CircuitConfig, CircuitOptions), "steer": (SteerConfig, SteerOptions),
            "report": ()}


EXTRA_KEYS = {"explain": {"skip": "bool", "cache_dir": "str | None"},
              "circuit": {"skip": "bool"}, "steer": {"skip": "bool"}, "report": {"skip": "bool"}}
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
    except OptionError as err:  # names its field: reported at that key
        problems.append(f"{loc.where((section, err.field))}: {err.named(config_key).rstrip('.')}")
        return None
    except LatentAuditError as err:
        problems.append(f"{loc.path}: [{section}] {err}")
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
    from latentaudit.judges.spec import JudgeSpec

    if spec is None or ":" not in spec:
        return spec
    return str(JudgeSpec.parse(spec, flag="judge").with_file(lambda f: _resolve(f, base)))


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
    from latentaudit.circuit.config import CircuitConfig
    from latentaudit.explain.config import ExplainConfig
    from latentaudit.sample import SampleConfig
    from latentaudit.steer.config import SteerConfig

    problems: list[str] = []
    base = loc.path.parent.resolve()
    sections = {}
    for name in _sections():
        body = data.get(name, {})
        if not isinstance(body, dict):
            problems.append(f"{loc.where((name,))}: must be a section ([{name}] with keys)")
            body = {}
        sections[name] = _values(body, name, loc, problems)
    top, entry, run_dir = _top_level(data, loc, base, out, problems)
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
    circuit = circuit_options = None
    if "circuit" in data:
        circuit_options = _build(CircuitOptions, sec["circuit"], "circuit", loc, problems)
        if not sec["circuit"].get("skip"):
            circuit = _build(CircuitConfig, sec["circuit"], "circuit", loc, problems)
            if circuit_options is not None and not circuit_options.upstream_sae:
                problems.append(f"{loc.where(('circuit',))}: key upstream_sae is missing; add "
                                'e.g. upstream_sae = ["qwen2.5-0.5b-instruct-l6"] (the SAE of '
                                "an earlier layer), or skip = true")
    if problems:
        head = f"{loc.path} has {len(problems)} problem(s); fix them and rerun:\n  " \
            if len(problems) > 1 else ""
        raise LatentAuditError(head + "\n  ".join(problems))
    judge, opts = built["judge"], built["steer_options"]
    judge.judge = _resolve_spec(judge.judge, base)
    opts.judge = _resolve_spec(opts.judge, base)
    opts.coherence_judge = _resolve_spec(opts.coherence_judge, base)
    opts.prompts = _resolve(opts.prompts, base)
    if circuit_options is not None:
        circuit_options.upstream_sae = tuple(_resolve(u, base) for u in
                                             circuit_options.upstream_sae)
    cache_dir = sec["explain"].get("cache_dir")
    return RunConfig(source=loc.path, settings=settings, out=run_dir.resolve(), entry=entry,
                     sample=built["sample"], judge=judge, pair=built["pair"],
                     attribute=built["attribute"], explain=explain,
                     explain_cache_dir=_path(cache_dir, base) if cache_dir else None,
                     steer=steer, steer_options=opts, report=not sec["report"].get("skip"),
                     raw=data, located=loc, circuit=circuit, circuit_options=circuit_options)


def _top_level(data: dict[str, Any], loc: Located, base: Path, out: str | Path | None,
               problems: list[str]) -> tuple[dict[str, Any], str, Path | None]:
    """The top-level keys with their paths resolved, the entry point and the run folder."""
    top = _values({k: v for k, v in data.items() if k not in _sections()}, "", loc, problems)
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
    if not given and not top.get("prompts"):
        problems.append(f"{loc.path}: nothing to start from; give prompts (a suite name or "
                        "file), completions, judged or dataset")
    run_dir = Path(out).resolve() if out is not None else (
        Path(top["out"]) if top.get("out") else None)
    if run_dir is None:
        problems.append(f"{loc.path}: key out is missing; add out = \"runs/NAME\" (the run "
                        "folder) or pass --out")
    return top, given[0] if given else "prompts", run_dir


def _corpus(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """[explain] values with a corpus file resolved from the config's folder."""
    corpus = values.get("corpus")
    if isinstance(corpus, str) and corpus not in ("dataset", "held-out", "outside"):
        values = {**values, "corpus": _resolve(corpus, base)}
    return values
