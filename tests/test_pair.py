"""Pairing: threshold rules on judged rows, the core dataset it writes, counts, and the CLI."""

from __future__ import annotations

import json

import pytest

from latentaudit.cli import main
from latentaudit.data.behaviour import load_behaviour, make_pairs
from latentaudit.errors import LatentAuditError
from latentaudit.judges import load_rubric
from latentaudit.judges.rubrics import copy_rubric
from latentaudit.pair import build_dataset, pair_file, read_judged


def judged(pid, i, validation, coherent=90, *, error=None, completion=None, outcome=None):
    answers = {}
    if validation is not None:
        answers["validation"] = {"score": 1.0 if validation == "VALIDATES" else 0.0,
                                 "label": validation, "probs": None, "raw": ""}
    if coherent is not None:
        answers["coherent"] = {"score": coherent, "label": None, "probs": None, "raw": ""}
    return {"prompt_id": pid, "prompt": f"Prompt {pid}?", "sample_index": i,
            "completion": completion if completion is not None else f"{pid} answer {i}",
            "prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5 + i],
            "finish_reason": "eos", "meta": {"fact": f"fact {pid}", "topic": "t"},
            "judge": "rules:x", "rubric": "false-belief", "rubric_source": None,
            "rubric_hash": "h", "answers": answers, "error": error, "judge_outcome": outcome}


ROWS = [
    judged("a", 0, "VALIDATES"), judged("a", 1, "CORRECTS"), judged("a", 2, "VALIDATES"),
    judged("a", 3, "CORRECTS"), judged("a", 4, "CORRECTS"),         # a: 2 pos, 3 neg
    judged("b", 0, "VALIDATES"), judged("b", 1, "EVADES"),
    judged("b", 2, "VALIDATES", coherent=10),                         # b: 1 pos only
    judged("c", 0, "CORRECTS"), judged("c", 1, None, None, error="validation: HTTP 500"),
    judged("c", 2, "VALIDATES"),                                      # c: 1 pos, 1 neg
    judged("d", 0, "VALIDATES", completion=""),                       # empty, no... ids present
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_counts_reasons_and_pairs_by_hand(tmp_path):
    path = write(tmp_path / "judged.jsonl", ROWS)
    res = build_dataset(read_judged(path), load_rubric("false-belief"), path, "all")
    got = {pid: (c["positive"], c["negative"], c["excluded"]) for pid, c in res.counts.items()}
    assert got == {"a": (2, 3, 0), "b": (1, 0, 2), "c": (1, 1, 1), "d": (1, 0, 0)}
    assert dict(res.reasons) == {"evades": 1, "incoherent": 1,
                                 "judge failed: validation: HTTP 500": 1}
    assert len(res.pairing.pairs) == 2 * 3 + 1 * 1
    assert set(res.pairing.skipped_prompts) == {"b", "d"}
    matched = build_dataset(read_judged(path), load_rubric("false-belief"), path, "matched")
    assert len(matched.pairing.pairs) == 2 + 1
    # each pair is a positive and a negative of the same prompt
    for p, q in res.pairing.pairs:
        assert res.rows[p]["label"] == "positive" and res.rows[q]["label"] == "negative"
        assert res.rows[p]["prompt_id"] == res.rows[q]["prompt_id"]


def test_dataset_rows_are_core_format_and_carry_ids_and_meta(tmp_path):
    path = write(tmp_path / "judged.jsonl", ROWS)
    out = tmp_path / "dataset.jsonl"
    res = pair_file(path, out)
    comps = load_behaviour(out)                         # the core format's own validation
    assert len(comps) == len(res.rows) == 9
    assert len(make_pairs(comps, "all").pairs) == 7
    first = comps[0]
    assert (first.prompt_id, first.label, first.score) == ("a", "positive", 1.0)
    assert first.prompt_token_ids == [1, 2, 3] and first.completion_token_ids == [4, 5]
    assert first.meta["fact"] == "fact a" and first.meta["sample_index"] == 0
    assert first.meta["finish_reason"] == "eos"
    assert first.meta["judge"]["answers"]["validation"] == {"score": 1.0, "label": "VALIDATES"}
    assert set(json.loads(out.read_text().splitlines()[0])) == {
        "prompt", "completion", "label", "prompt_id", "score", "meta", "prompt_token_ids",
        "completion_token_ids"}


def test_empty_completion_without_ids_is_excluded(tmp_path):
    row = judged("e", 0, "VALIDATES", completion="")
    del row["completion_token_ids"]
    path = write(tmp_path / "j.jsonl", [row, judged("e", 1, "CORRECTS")])
    res = build_dataset(read_judged(path), load_rubric("false-belief"), path)
    assert dict(res.reasons) == {"empty completion": 1} and len(res.rows) == 1


def test_edited_threshold_changes_the_split(tmp_path):
    copy_rubric(load_rubric("false-belief"), tmp_path / "r")
    spec = json.loads((tmp_path / "r" / "false-belief.json").read_text())
    spec["rules"].insert(0, {"when": {"question": "validation", "label": ["EVADES"]},
                             "then": "negative", "why": "evasion counts as negative"})
    (tmp_path / "r" / "false-belief.json").write_text(json.dumps(spec))
    path = write(tmp_path / "judged.jsonl", ROWS)
    res = pair_file(path, tmp_path / "d.jsonl", rubric=tmp_path / "r" / "false-belief.json")
    assert (res.counts["b"]["positive"], res.counts["b"]["negative"]) == (1, 1)
    assert len(res.pairing.pairs) == 7 + 1


def test_human_outcome_overrides_thresholds(tmp_path):
    rows = [judged("h", 0, None, None, outcome="positive"),
            judged("h", 1, "VALIDATES", outcome="negative")]
    path = write(tmp_path / "j.jsonl", rows)
    res = build_dataset(read_judged(path), load_rubric("false-belief"), path)
    assert [r["label"] for r in res.rows] == ["positive", "negative"]


def test_errors_name_the_file_and_line(tmp_path):
    path = write(tmp_path / "j.jsonl", [ROWS[0], {"prompt": "x", "completion": "y"}])
    with pytest.raises(LatentAuditError, match=r"j\.jsonl:2: not a judged row"):
        read_judged(path)
    text = json.dumps(ROWS[0])
    path.write_text(text[:-1] + "\n" + json.dumps(ROWS[1]) + "\n[1]\n")
    with pytest.raises(LatentAuditError) as err:  # every bad line at once, with its column
        read_judged(path)
    assert f"j.jsonl:1: not valid JSON (Expecting ',' delimiter at column {len(text)})" \
        in str(err.value)
    assert "j.jsonl:3: not a judged row" in str(err.value) and "2 problem(s)" in str(err.value)
    path = write(tmp_path / "j.jsonl", [judged("z", 0, "EVADES")])
    with pytest.raises(LatentAuditError, match="no completion was labelled.*evades: 1"):
        pair_file(path, tmp_path / "d.jsonl")
    mixed = [ROWS[0], {**ROWS[1], "rubric": "evil"}]
    with pytest.raises(LatentAuditError, match="pass --rubric"):
        pair_file(write(tmp_path / "m.jsonl", mixed), tmp_path / "d.jsonl")


def test_cli_judge_then_pair_end_to_end(tmp_path, capsys):
    comps = []
    for pid, texts in {"bats": ["Yes, exactly, they are blind.", "That's a myth: bats see.",
                                "Absolutely right!"],
                       "koala": ["Actually, koalas are marsupials.", "Hmm, hard to say."]}.items():
        for i, text in enumerate(texts):
            comps.append({"prompt_id": pid, "prompt": f"{pid}?", "completion": text,
                          "sample_index": i, "prompt_token_ids": [7, 8],
                          "completion_token_ids": [9, 10 + i], "meta": {"fact": "f"}})
    comp = write(tmp_path / "completions.jsonl", comps)
    judged_path, out = tmp_path / "judged.jsonl", tmp_path / "dataset.jsonl"
    assert main(["judge", "--completions", str(comp), "--rubric", "false-belief",
                 "--judge", "rules", "--out", str(judged_path)]) == 0
    capsys.readouterr()
    assert main(["pair", "--judged", str(judged_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bats" in printed and "2 pairs (all) from 1 of 2 prompts" in printed
    lines = {ln.split()[0]: ln.split()[1:] for ln in printed.splitlines() if ln.strip()}
    assert lines["bats"] == ["2", "1", "0"] and lines["koala"] == ["0", "1", "1"]
    assert main(["pair", "--judged", str(judged_path), "--out", str(out),
                 "--pairing", "matched"]) == 0
    assert "1 pairs (matched)" in capsys.readouterr().out
    comps_out = load_behaviour(out)
    assert [c.label for c in comps_out] == ["positive", "negative", "positive", "negative"]
    assert comps_out[0].completion_token_ids == [9, 10]
    assert main(["pair", "--judged", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
