"""Human labels: export completions for labelling, import the filled file as a judge.

Export (``.csv`` or ``.jsonl``, chosen by suffix) writes one row per distinct completion with the
columns ``key, prompt_id, sample_index, prompt, completion, fact``, then one empty column per
rubric question (a number of its scale or one of its labels), then an empty ``label`` column
(``positive`` / ``negative`` / ``excluded``: when filled it overrides the rubric's threshold
rule) and ``note``. ``key`` ties a row to its completion (sha256 of prompt, completion and fact).

Import validates every row and reports all problems with file:line (CSV records may span lines;
the line is where the record starts). A row without ``key`` names its completion by
``prompt_id`` and ``sample_index`` instead (as in files labelled by hand outside the sheet).
A row whose question columns and label are all blank is unlabelled: its completion gets an
error verdict ("no human label") and is excluded.

CSV safety: spreadsheet programs run a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or
a carriage return as a formula, and completions are model output (OWASP, "CSV Injection"). Such
cells, and cells that start with ``'``, are written with one ``'`` before them, which makes the
program show them as text; reading a CSV file removes one leading ``'`` from every cell, so
export → import gives back the original text.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from latentaudit._io import atomic_open
from latentaudit.errors import LatentAuditError
from latentaudit.judges.base import JudgeItem, Verdict
from latentaudit.judges.rubrics import OUTCOMES, Answer, Question, Rubric

BASE_COLUMNS = ["key", "prompt_id", "sample_index", "prompt", "completion", "fact"]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula."""


def to_sheet(value: Any) -> str:
    """A CSV cell that a spreadsheet shows as text (see the module docstring)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith((*FORMULA_START, "'")) else text


def from_sheet(text: str) -> str:
    """The original text of a cell written by :func:`to_sheet`."""
    return text[1:] if text.startswith("'") else text


def columns(rubric: Rubric) -> list[str]:
    return BASE_COLUMNS + [q.name for q in rubric.questions] + ["label", "note"]


def export_for_labelling(items: Sequence[JudgeItem], rubric: Rubric, path: str | Path) -> int:
    """Write the distinct completions of ``items`` for labelling; returns how many rows."""
    path = Path(path)
    rows, seen = [], set()
    for it in items:
        if it.content_key in seen:
            continue
        seen.add(it.content_key)
        row = {"key": it.content_key, "prompt_id": it.prompt_id, "sample_index": it.sample_index,
               "prompt": it.prompt_text, "completion": it.completion, "fact": it.fact}
        row.update({c: None for c in columns(rubric)[len(BASE_COLUMNS):]})
        rows.append(row)
    if path.suffix == ".csv":
        with atomic_open(path, "w", encoding="utf-8", newline="") as f:
            writer, cols = csv.writer(f), columns(rubric)
            writer.writerow([to_sheet(c) for c in cols])
            writer.writerows([to_sheet(r[c]) for c in cols] for r in rows)
    elif path.suffix == ".jsonl":
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        raise LatentAuditError(f"--export-labels {path}: use a .csv or .jsonl file name.")
    return len(rows)


def label_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, row) pairs from a .csv (dict rows, cells as they were exported) or .jsonl file."""
    if path.suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [from_sheet(n) for n in reader.fieldnames or ()]
            names = set(reader.fieldnames)
            if "key" not in names and not {"prompt_id", "sample_index"} <= names:
                raise LatentAuditError(f"{path}:1: the header has no 'key' column (nor "
                                       "'prompt_id' and 'sample_index'); label the file "
                                       "written by --export-labels.")
            start = reader.line_num + 1
            for row in reader:
                yield start, {k: from_sheet(v) if isinstance(v, str) else v
                              for k, v in row.items()}
                start = reader.line_num + 1
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                yield n, ValueError(f"not valid JSON ({err.msg})")


def read_labels(path: str | Path, rubric: Rubric) -> dict[str, Verdict]:
    """key -> human verdict, for every labelled row; raises one error listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise LatentAuditError(f"--judge human:{path}: no such file.")
    if path.suffix not in (".csv", ".jsonl"):
        raise LatentAuditError(f"--judge human:{path}: expected a .csv or .jsonl labels file.")
    out, errs, lines = {}, [], {}
    for n, row in label_rows(path):
        where = f"{path}:{n}"
        if isinstance(row, ValueError) or not isinstance(row, dict):
            errs.append(f"{where}: {row if isinstance(row, ValueError) else 'expected an object'}")
            continue
        verdict, problems = _row_verdict(row, rubric, where)
        errs.extend(problems)
        key = str(row.get("key") or "").strip() or _id_key(row.get("prompt_id"),
                                                           row.get("sample_index"))
        if not key:
            errs.append(f"{where}: column 'key' is empty (and 'prompt_id' / 'sample_index' do "
                        "not name a completion); keep the key written by --export-labels")
            continue
        if key in lines:
            errs.append(f"{where}: key {key} is labelled again (first at line {lines[key]})")
            continue
        lines[key] = n
        if verdict is not None:
            out[key] = verdict
    if errs:
        shown = errs[:20] + ([f"... and {len(errs) - 20} more"] if len(errs) > 20 else [])
        raise LatentAuditError(f"{path} has {len(errs)} problem(s); fix them and rerun:\n  "
                               + "\n  ".join(shown))
    return out


def _id_key(prompt_id: Any, sample_index: Any) -> str:
    """The label key of a completion named by prompt id and sample index ('' if not both)."""
    if _blank(prompt_id) or _blank(sample_index) or isinstance(sample_index, bool):
        return ""
    try:
        return f"{str(prompt_id).strip()}#{int(str(sample_index).strip())}"
    except ValueError:
        return ""


def label_for(labels: dict[str, Verdict], item: JudgeItem) -> Verdict | None:
    """The verdict labelled for ``item``: by its key, else by prompt id and sample index."""
    return labels.get(item.content_key) or labels.get(_id_key(item.prompt_id,
                                                               item.sample_index))


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _row_verdict(row: dict, rubric: Rubric, where: str) -> tuple[Verdict | None, list[str]]:
    errs, answers = [], {}
    for q in rubric.questions:
        value = row.get(q.name)
        if _blank(value):
            continue
        answer = None if isinstance(value, bool) else _exact(q, str(value).strip())
        if answer is None:
            allowed = ([f"a number in {q.scale[0]}..{q.scale[1]}"] if q.scale else []) \
                + list(q.labels)
            errs.append(f"{where}: column '{q.name}' is {value!r}; it must be "
                        f"{' or '.join(allowed)}")
            continue
        answers[q.name] = answer
    label = row.get("label")
    outcome = None
    if not _blank(label):
        outcome = str(label).strip().lower()
        if outcome not in OUTCOMES:
            errs.append(f"{where}: column 'label' is {label!r}; it must be "
                        f"{', '.join(OUTCOMES)} or blank")
    if errs or (not answers and outcome is None):
        return None, errs
    return Verdict(answers=answers, outcome=outcome), []


def _exact(q: Question, text: str) -> Answer | None:
    """A label of the question (any case) or a plain number in its scale; else None."""
    if text.upper() in q.labels:
        return Answer(score=q.label_score(text.upper()), label=text.upper(), raw="human")
    try:
        value = float(text)
    except ValueError:
        return None
    if q.scale and q.scale[0] <= value <= q.scale[1]:
        return Answer(score=value, raw="human")
    return None


class HumanJudge:
    """Serves the verdicts of a filled labels file."""

    def __init__(self, path: str | Path, rubric: Rubric):
        self.rubric = rubric
        self.path = Path(path)
        self.labels = read_labels(self.path, rubric)
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        self.id = f"human:{self.path.name}#{digest}"

    def grade(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return [label_for(self.labels, it)
                or Verdict(error=f"no human label in {self.path.name}") for it in items]
