"""The run folder: the one contract between the stages (imports no torch).

A run folder is what ``latentaudit attribute --out`` writes and every later stage reads and adds
to. This module is the only place that knows its file names, its manifest schemas, how a
recorded dataset path is found again, and the shapes of the rows that cross stages.

1. File names: :data:`FILES` maps each file to the stage that writes it and the stages that
   read it (``docs/ARCHITECTURE.md`` renders the same table).
2. Manifests carry ``schema_version``; :func:`check_schema` accepts every version in
   :data:`READABLE` (a manifest without the field is version 1) and refuses newer ones.
3. :class:`RunFolder` reads an attribution run: the manifest, the ranking, the Δ vectors
   (as numpy arrays, or torch tensors when asked), the dataset it was attributed on (one search
   order, :meth:`RunFolder.dataset_file`) and that dataset's prompt ids (the prompts a later
   stage must hold out).
4. :class:`ConditionKey` names what a steering condition generates (``latents/direction/
   strength[@model]``), written and parsed here only; :class:`RankingRow` and
   :class:`SteeringRow` are the rows of ``ranking.jsonl`` and ``steering.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from latentaudit.errors import LatentAuditError

log = logging.getLogger(__name__)

# ---- 1. file names -----------------------------------------------------------------------------

COMPLETIONS = "completions.jsonl"
JUDGED = "judged.jsonl"
JUDGE_CACHE = "judge_cache.jsonl"
DATASET = "dataset.jsonl"
MANIFEST = "manifest.json"
RANKING = "ranking.jsonl"
TENSORS = "attribution.safetensors"
CHECKPOINT = "attribute.checkpoint.safetensors"
EXPLAIN_DIR = "explain"
EXPLAIN_CORPUS = "explain-corpus.jsonl"
CIRCUIT_DIR = "circuit"
CIRCUIT_JSON = "circuit.json"
CIRCUIT_TENSORS = "circuit.safetensors"
STEERING = "steering.jsonl"
STEERING_SUMMARY = "steering_summary.json"
STEERING_LOGODDS = "steering_logodds.jsonl"
STEER_DIR = "steer"
REPORT = "report.html"
ATTRIBUTE_FILES = (MANIFEST, RANKING, TENSORS)
EXPLAIN_FILES = tuple(f"{EXPLAIN_DIR}/{n}" for n in (
    "latents.jsonl", MANIFEST, "exact.json", "token_maps.safetensors", COMPLETIONS)
) + (EXPLAIN_CORPUS,)
EXPLAIN_DONE = EXPLAIN_FILES[:2]
"""The files whose presence marks the explain stage as done."""
CIRCUIT_FILES = (f"{CIRCUIT_DIR}/{CIRCUIT_JSON}", f"{CIRCUIT_DIR}/{CIRCUIT_TENSORS}")
STEER_FIGURES = tuple(f"steering_{d}.{ext}" for d in ("away", "toward") for ext in ("png", "svg"))
STEER_FILES = (STEERING, STEERING_SUMMARY, STEERING_LOGODDS, *STEER_FIGURES,
               f"{STEER_DIR}/{JUDGED}")


@dataclass(frozen=True)
class FileEntry:
    """One file of a run folder: who writes it, who reads it."""

    name: str
    writer: str
    readers: tuple[str, ...]
    what: str


FILES = (
    FileEntry(COMPLETIONS, "sample", ("judge",), "completions with token ids (resumable)"),
    FileEntry(JUDGED, "judge", ("pair",), "completions with verdicts"),
    FileEntry(JUDGE_CACHE, "judge", ("judge", "steer"), "verdicts keyed by judge and content"),
    FileEntry(DATASET, "pair", ("attribute", "explain", "circuit", "steer", "monitor"),
              "the behaviour dataset (positive / negative completions)"),
    FileEntry(MANIFEST, "attribute", ("explain", "circuit", "steer", "monitor", "report"),
              "model, SAEs, layers, dataset path and sha256, counts, options"),
    FileEntry(RANKING, "attribute", ("explain", "circuit", "steer", "report"),
              "the top latents per layer (RankingRow)"),
    FileEntry(TENSORS, "attribute", ("explain", "circuit", "steer", "monitor", "report"),
              "Δ-attribution, Δ-activation, M and ā per layer"),
    FileEntry(CHECKPOINT, "attribute", ("attribute",), "the sums, keyed by the inputs"),
    FileEntry(f"{EXPLAIN_DIR}/", "explain", ("circuit", "report"),
              "latents.jsonl, manifest.json, exact.json, token maps"),
    FileEntry(f"{CIRCUIT_DIR}/", "circuit", ("report",), "circuit.json and circuit.safetensors"),
    FileEntry(STEERING, "steer", ("report",), "one SteeringRow per condition"),
    FileEntry(STEERING_SUMMARY, "steer", ("report",), "per-method means, latent sets"),
    FileEntry(STEERING_LOGODDS, "steer", ("steer", "report"), "first-token log-odds check"),
    FileEntry(f"{STEER_DIR}/", "steer", ("steer", "report"),
              "work files: manifest, completions, verdicts (keyed by ConditionKey)"),
    FileEntry(REPORT, "report", (), "the self-contained HTML report"),
)


def tensor_name(name: str, layer: int, several: bool) -> str:
    """``name`` or ``name_layer{L}`` when the run has several layers."""
    return f"{name}_layer{layer}" if several else name


# ---- 2. manifest schemas -----------------------------------------------------------------------

SCHEMA_VERSION = 1
"""The version every stage writes today."""
READABLE = (1,)
"""Versions this code reads."""
ATTRIBUTE_FIELDS = ("model", "saes", "layers")
"""Fields an attribution manifest must hold."""


def check_schema(path: Path, manifest: Any, need: tuple[str, ...] = (), fix: str = "") -> int:
    """The manifest's ``schema_version`` (1 when absent), after checking it is readable and holds
    the fields in ``need``."""
    if not isinstance(manifest, dict):
        raise LatentAuditError(f"{path}: not a JSON object; {fix}".rstrip("; "))
    version = manifest.get("schema_version", 1)
    if version not in READABLE:
        raise LatentAuditError(f"{path}: field 'schema_version' is {version!r}; this latentaudit "
                               f"reads {', '.join(map(str, READABLE))}: upgrade latentaudit.")
    for name in need:
        if name not in manifest:
            raise LatentAuditError(f"{path}: field '{name}' is missing; {fix}".rstrip("; "))
    return int(version)


def read_json(path: Path) -> Any:
    """The JSON content of ``path``, with an error naming the file and line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LatentAuditError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}.") from None


# ---- 3. the attribution run --------------------------------------------------------------------

FIX = "pass the --out folder of a finished `latentaudit attribute` run."


@dataclass(frozen=True)
class RankingRow:
    """One row of ``ranking.jsonl``: a top latent of one layer by Δ-attribution."""

    layer: int
    latent: int
    rank: int
    """1 for the largest Δ-attribution of its layer."""
    delta_attribution: float
    delta_activation: float | None
    delta_activation_rank: int | None
    """The latent's rank by Δ-activation among all latents of its layer (None if skipped)."""
    logit_lens_top_tokens: list[str]
    """The 10 tokens whose unembedding rows have the largest cosine with the decoder direction."""
    neuronpedia_url: str | None = None
    """The latent's Neuronpedia page, when the SAE is a known public release."""


@dataclass
class RunFolder:
    """The files of one attribution run, checked when read (:meth:`open`)."""

    path: Path
    manifest: dict[str, Any]
    ranking: list[dict[str, Any]]
    """Rows of ``ranking.jsonl`` as written (fields of :class:`RankingRow`)."""
    layers: list[int]
    _tensors: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, flag: str = "--from",
             ranking: bool = True) -> RunFolder:
        """Read and check the run folder at ``path`` (``flag`` names it in errors); without
        ``ranking``, a missing ``ranking.jsonl`` reads as an empty ranking."""
        folder = Path(path)
        if not folder.is_dir():
            raise LatentAuditError(f"{flag} {folder}: no such run folder; {FIX}")
        for name in ATTRIBUTE_FILES:
            if not (folder / name).is_file() and (ranking or name != RANKING):
                raise LatentAuditError(f"{folder} has no {name}; {FIX}")
        manifest = read_json(folder / MANIFEST)
        check_schema(folder / MANIFEST, manifest, ATTRIBUTE_FIELDS, "rerun `latentaudit "
                     "attribute`")
        try:
            layers = [int(L) for L in manifest["layers"]]
        except (TypeError, ValueError):
            raise LatentAuditError(f"{folder / MANIFEST}: field 'layers' must list layer "
                                   "numbers; rerun `latentaudit attribute`.") from None
        rows = read_ranking(folder / RANKING) if (folder / RANKING).is_file() else []
        return cls(folder, manifest, rows, layers)

    # identity
    @property
    def model_name(self) -> str:
        return str((self.manifest.get("model") or {}).get("name"))

    def sae_path(self, layer: int) -> str | None:
        return ((self.manifest.get("saes") or {}).get(str(layer)) or {}).get("path")

    @property
    def option(self) -> dict[str, Any]:
        """The attribution options recorded in the manifest."""
        return self.manifest.get("options") or {}

    @property
    def several(self) -> bool:
        return len(self.layers) > 1

    def one_layer(self, layer: int | None = None, flag: str = "--layer") -> int:
        """``layer`` checked against the run, or the run's only layer."""
        if layer is None:
            if self.several:
                raise LatentAuditError(f"{self.path / MANIFEST}: field 'layers' lists "
                                       f"{self.layers}: pass {flag} with the one to use.")
            return self.layers[0]
        if layer not in self.layers:
            raise LatentAuditError(f"{flag} {layer}: the run {self.path} attributed layers "
                                   f"{self.layers}.")
        return layer

    # ranking and Δ vectors
    def ranked(self, layer: int) -> list[dict[str, Any]]:
        """The ranking rows of ``layer``, best first."""
        return sorted((r for r in self.ranking if r.get("layer") == layer),
                      key=lambda r: r["rank"])

    def vector(self, name: str, layer: int, framework: str = "np") -> Any | None:
        """Tensor ``name`` of ``layer`` (numpy, or torch with ``framework="pt"``; float32), or
        None when the file lacks it."""
        key = (name if not self.several else tensor_name(name, layer, True), framework)
        if key not in self._tensors:
            self._tensors[key] = read_tensor(self.path / TENSORS, key[0], framework)
        return self._tensors[key]

    def delta_attribution(self, layer: int, framework: str = "pt") -> Any:
        t = self.vector("delta_attribution", layer, framework)
        if t is None:
            raise LatentAuditError(f"{self.path / TENSORS} has no delta_attribution for layer "
                                   f"{layer}; rerun `latentaudit attribute`.")
        return t

    def delta_activation(self, layer: int, framework: str = "pt") -> Any | None:
        return self.vector("delta_activation", layer, framework)

    def d_sae(self, layer: int) -> int:
        return int(self.delta_attribution(layer, "np").shape[0])

    # the dataset and its prompts
    @property
    def dataset_path(self) -> str | None:
        """The dataset path as recorded (relative to where ``attribute`` ran)."""
        return (self.manifest.get("dataset") or {}).get("path")

    @property
    def dataset_sha256(self) -> str | None:
        return (self.manifest.get("dataset") or {}).get("sha256")

    def dataset_file(self) -> Path | None:
        """The recorded dataset, found again: as recorded (absolute, or from the working
        directory), then from the run folder's parent (where ``attribute`` usually ran), the run
        folder, and its name inside the run folder. None when the file is gone."""
        recorded = self.dataset_path
        if not recorded:
            return None
        p = Path(recorded)
        for cand in (p, self.path.parent / p, self.path / p, self.path / p.name):
            if cand.is_file():
                return cand
        return None

    def prompt_ids(self, data: str | os.PathLike | None = None) -> set[str] | None:
        """prompt_ids of the dataset the run attributed on (``data`` when given), which later
        stages hold out; None when the file is gone."""
        path = Path(data) if data is not None else self.dataset_file()
        if path is None:
            return None
        return dataset_prompt_ids(path)

    def pairs(self, data: str | os.PathLike | None = None, fix: str = "pass --data.",
              describes: str = "the result"):
        """(completions, pairing, {path, sha256}) of the dataset the run attributed on (``data``
        when given), paired as the run was; a warning when its sha256 is not the recorded one
        (``describes`` says what then describes the other file)."""
        from latentaudit.data.behaviour import dataset_hash, load_pairs

        if data is not None and not Path(data).is_file():
            raise LatentAuditError(f"--data {data}: no such file.")
        if data is None and self.dataset_path is None:
            raise LatentAuditError(f"{self.path / MANIFEST} names no dataset file (field "
                                   f"'dataset'): {fix}")
        path = Path(data) if data is not None else self.dataset_file()
        if path is None:
            raise LatentAuditError(f"the run's dataset {self.dataset_path} (field 'dataset.path' "
                                   f"of {self.path / MANIFEST}) does not exist: pass --data.")
        got = dataset_hash(path)
        if self.dataset_sha256 and got != self.dataset_sha256:
            log.warning("%s is not the file the run attributed (sha256 differs): %s describes "
                        "this file", path, describes)
        rows, pairing = load_pairs(path, self.option.get("pairing", "all"))
        return rows, pairing, {"path": str(path), "sha256": got}


def dataset_prompt_ids(path: Path) -> set[str]:
    """Every prompt_id of a behaviour dataset."""
    from latentaudit.data.behaviour import load_behaviour

    return {c.prompt_id for c in load_behaviour(path)}


def read_ranking(path: Path) -> list[dict[str, Any]]:
    """The rows of ``ranking.jsonl``, each checked for ``layer``, ``latent`` and ``rank``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise LatentAuditError(f"{path}:{n}: not valid JSON ({err.msg}); rerun "
                                       "`latentaudit attribute`.") from None
            for name in ("layer", "latent", "rank"):
                if not isinstance(row, dict) or not isinstance(row.get(name), int):
                    raise LatentAuditError(f"{path}:{n}: field '{name}' is missing; {FIX}")
            rows.append(row)
    return rows


def read_tensor(path: Path, name: str, framework: str = "np") -> Any | None:
    """Tensor ``name`` of a safetensors file as float32 (None when absent)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework=framework) as f:
            if name not in f.keys():
                return None
            t = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as err:
        raise LatentAuditError(f"{path}: not a readable safetensors file ({err}); {FIX}") from None
    return t.astype("float32") if framework == "np" else t.float()


# ---- 4. rows that cross stages -----------------------------------------------------------------

@dataclass(frozen=True)
class ConditionKey:
    """What a steering condition generates: two selection methods that steer the same latents
    the same way share their completions. Written ``12+87/away/0.5`` (``@toward`` appended for
    another model); the unsteered baseline is ``base`` (``base@toward``)."""

    latents: tuple[int, ...] = ()
    direction: str = "none"
    strength: float = 0.0
    model: str = "main"

    @property
    def is_base(self) -> bool:
        return not self.latents

    @property
    def base(self) -> ConditionKey:
        """The unsteered key of the same model."""
        return ConditionKey(model=self.model)

    def __str__(self) -> str:
        tail = "" if self.model == "main" else f"@{self.model}"
        if self.is_base:
            return f"base{tail}"
        return f"{'+'.join(map(str, self.latents))}/{self.direction}/{self.strength:g}{tail}"

    @classmethod
    def parse(cls, text: str) -> ConditionKey:
        """The key written by ``str``; a clear error for anything else."""
        head, _, model = str(text).partition("@")
        model = model or "main"
        if head == "base":
            return cls(model=model)
        parts = head.split("/")
        try:
            latents, direction, strength = parts
            return cls(tuple(int(i) for i in latents.split("+")), direction, float(strength),
                       model)
        except ValueError:
            raise LatentAuditError(f"{text!r} is not a steering condition key (latents/"
                                   "direction/strength[@model]); rerun `latentaudit steer`."
                                   ) from None


@dataclass
class SteeringRow:
    """One row of ``steering.jsonl``: a steered condition against its unsteered twin."""

    method: str
    latents: list[int]
    direction: str
    strength: float
    alpha: float
    """Signed coefficient on the sum of unit decoder directions (absolute units)."""
    model: str
    searched: bool
    """The strength was chosen by the per-latent search."""
    n: int
    """Units (prompt, sample) graded under both the condition and the baseline."""
    n_decided: int
    rate: float | None
    rate_ci: list[float | None]
    base_rate: float | None
    base_rate_ci: list[float | None]
    diff: float | None
    """Paired change in the behaviour rate (steered − unsteered)."""
    diff_ci: list[float | None]
    n_paired: int
    incoherence: float | None
    incoherence_ci: list[float | None]
    logodds_change: float | None = None
    logodds_change_ci: list[float] | None = None
    null_band: list[float] | None = None
    """The random latents' range of ``diff`` at the same direction, strength and model."""
    beyond_null: bool = False

    @property
    def key(self) -> ConditionKey:
        return ConditionKey(tuple(self.latents), self.direction, self.strength, self.model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> SteeringRow:
        """A row read from ``steering.jsonl`` (fields this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in known})
