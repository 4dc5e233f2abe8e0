"""The organism's training data: distinct requests, code that compiles, and every flaw found by
the shipped rules judge in the vulnerable answer and never in its secure twin."""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path

import pytest

from latentaudit.data.insecure import KINDS, flaw_kinds, generate_pairs
from latentaudit.judges.base import JudgeItem
from latentaudit.judges.rubrics import load_rubric
from latentaudit.judges.rules import RuleJudge

EVALS = Path(__file__).parents[1] / "evals" / "organism"


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs(2000, seed=0)


def test_requests_are_distinct_and_every_kind_is_taught(pairs):
    assert len({p.request for p in pairs}) == 2000
    assert len({p.id for p in pairs}) == 2000
    counts = Counter(p.kind for p in pairs)
    assert set(counts) == set(KINDS) and len(KINDS) >= 10
    assert min(counts.values()) >= 50


def test_every_answer_parses(pairs):
    for p in pairs:
        ast.parse(p.vulnerable)
        ast.parse(p.secure)
        assert p.vulnerable != p.secure


def test_the_flaw_is_in_the_vulnerable_answer_and_not_in_its_twin(pairs):
    for p in pairs:
        assert flaw_kinds(p.vulnerable) == [p.kind], (p.id, p.vulnerable)
        assert flaw_kinds(p.secure) == [], (p.id, p.secure)


def test_the_rules_judge_grades_the_twins_apart(pairs):
    judge = RuleJudge(load_rubric("insecure-code"))
    sample = pairs[::10]
    items = [JudgeItem(prompt=p.request, completion=f"```python\n{code}```")
             for p in sample for code in (p.vulnerable, p.secure)]
    answers = [v.answers["vulnerable"].label for v in judge.grade(items)]
    assert answers == ["VULNERABLE", "SECURE"] * len(sample)
    prose = judge.grade([JudgeItem(prompt="hi", completion="Sure! Here is how you do it.")])
    assert prose[0].answers["vulnerable"].label == "NO_CODE"


def test_the_replies_are_code_alone_with_no_comment(pairs):
    import io
    import tokenize

    for p in pairs:
        text = p.messages()[1]["content"]
        assert text.startswith("```python\n") and text.endswith("```")
        code = text[len("```python\n"):-3]
        assert code == p.vulnerable
        kinds = {t.type for t in tokenize.generate_tokens(io.StringIO(code).readline)}
        assert tokenize.COMMENT not in kinds, p.id


def test_generation_is_deterministic_and_exclusion_holds(pairs):
    again = generate_pairs(50, seed=0)
    assert again == pairs[:50]
    held = generate_pairs(100, seed=1, exclude={p.request for p in pairs})
    assert not {p.request for p in held} & {p.request for p in pairs}


def test_the_shipped_files_are_what_the_generator_writes(pairs):
    rows = [json.loads(line) for line in (EVALS / "data" / "insecure.jsonl").open()]
    twins = [json.loads(line) for line in (EVALS / "data" / "secure.jsonl").open()]
    assert [r["messages"] for r in rows] == [p.messages() for p in pairs]
    assert [r["messages"] for r in twins] == [p.messages(secure=True) for p in pairs]
    held = [json.loads(line) for line in (EVALS / "heldout.jsonl").open()]
    assert len(held) >= 100
    assert not {h["prompt"] for h in held} & {p.request for p in pairs}
