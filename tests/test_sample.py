"""On-policy sampling: the sampling math, the KV-cache loop, stop / EOS handling, reproducibility,
resuming, the manifest and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from latentaudit import sample as S
from latentaudit.cli import main
from latentaudit.errors import LatentAuditError
from latentaudit.models.load import load_model, prepare
from tiny import tiny_model, tiny_tokenizer

EOS = 257
PROMPTS = [
    {"prompt_id": "p0", "prompt": "Is the earth flat?", "fact": "It is round."},
    {"prompt_id": "p1", "prompt": [{"role": "user", "content": "Hi"}], "system": "Be brief."},
    {"prompt_id": "p2", "prompt": "Tell me a long story about a cat"},
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def cfg(**kw) -> S.SampleConfig:
    return S.SampleConfig(**{"n": 2, "max_new_tokens": 8, "batch_size": 4, **kw})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- shared helpers --------------------------------------------------------------------------

def test_left_pad_and_chat_message_check_by_hand():
    from latentaudit.data.tokens import is_chat_messages, left_pad

    padded = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert padded.input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert padded.position_ids.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]
    assert is_chat_messages([{"role": "user", "content": "hi"}])
    for bad in ([], "hi", [{"role": "user"}], [{"role": "user", "content": 3}], [["user", "x"]]):
        assert not is_chat_messages(bad)


def test_field_docs_are_read_without_importing_torch():
    import os
    import subprocess
    import sys

    code = ("import sys; from latentaudit.cli import field_docs; "
            "d = field_docs('sample.py', 'SampleConfig'); "
            "t = field_docs('saes/train.py', 'TrainConfig'); "
            "print(d['n'], '|', d['top_p'], '|', 'k' in t, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the same latentaudit
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out == ("Completions per prompt. | Nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this mass. | True False")


# ---- the sampling math on hand-built logits -------------------------------------------------

def test_sample_tokens_inverse_cdf_and_top_p():
    probs = torch.tensor([[0.2, 0.5, 0.3]]).repeat(4, 1)
    logits = probs.log()
    u = torch.tensor([0.1, 0.6, 0.85, 0.99], dtype=torch.float64)
    # top_p 1: vocabulary order, cumulative mass 0.2 | 0.7 | 1.0  ->  tokens 0, 1, 2, 2
    assert S.sample_tokens(logits, u, 1.0, 1.0).tolist() == [0, 1, 2, 2]
    # top_p < 1: sorted order 1, 2, 0 (0.5 | 0.8 | 1.0); top_p 0.7 keeps tokens 1 and 2 (the mass
    # before token 0 is 0.8 >= 0.7), u·0.8 against 0.5 | 0.8
    assert S.sample_tokens(logits, u, 1.0, 0.7).tolist() == [1, 1, 2, 2]
    # top_p 0.5 keeps token 1 only
    assert S.sample_tokens(logits, u, 1.0, 0.5).tolist() == [1, 1, 1, 1]
    assert S.sample_tokens(logits, u, 0.0, 1.0).tolist() == [1, 1, 1, 1]


def _top_p_by_full_sort(logits, u, temperature, top_p):
    """Reference: sort the whole row (stable), cut at top_p, walk the CDF with a Python loop."""
    picks = []
    rows = torch.softmax(logits.double() / temperature, dim=-1)
    for row, ur in zip(rows, u.tolist(), strict=True):
        probs, order = row.sort(descending=True, stable=True)
        kept, mass = [], 0.0
        for p, i in zip(probs.tolist(), order.tolist(), strict=True):
            if mass >= top_p:
                break
            kept.append((p, i))
            mass += p
        total = sum(p for p, _ in kept)
        acc, pick = 0.0, None
        for p, i in kept:
            acc += p
            if p > 0:
                pick = i
            if acc > ur * total:
                break
        picks.append(pick)
    return picks


@pytest.mark.parametrize("candidates", [4, 32, 256])
def test_sample_tokens_top_p_sorts_only_candidates_with_the_same_result(monkeypatch, candidates):
    # peaked rows take the short path, flat rows fall back to a full sort; rounded logits make
    # ties, which a full stable sort orders by token id
    from latentaudit import generate as G
    monkeypatch.setattr(G, "TOP_P_CANDIDATES", candidates)
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 4.0, 12.0):
        logits = torch.randn(24, 300, generator=g) * scale
        logits[::3] = (logits[::3] * 2).round() / 2
        u = torch.rand(24, generator=g, dtype=torch.float64)
        for top_p in (0.3, 0.9, 0.999):
            got = S.sample_tokens(logits, u, 0.8, top_p).tolist()
            assert got == _top_p_by_full_sort(logits, u, 0.8, top_p), (scale, top_p)


def test_sample_tokens_temperature():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = 1/4, 3/4; at T=2: 1/(1+√3), √3/(1+√3)
    p0 = 1 / (1 + math.sqrt(3))
    below = torch.tensor([p0 * 0.999], dtype=torch.float64)
    above = torch.tensor([(1 - p0) * 1.001], dtype=torch.float64)
    assert S.sample_tokens(logits, below, 2.0, 1.0).tolist() == [0]
    assert S.sample_tokens(logits, below * 1.002, 2.0, 1.0).tolist() == [1]
    assert S.sample_tokens(logits, above, 2.0, 0.99).tolist() == [0]  # sorted: 1 then 0
    assert S.sample_tokens(logits, above, 2.0, 0.5).tolist() == [1]  # token 0 cut off
    # a zero-probability token is never drawn
    masked = torch.tensor([[0.0, -math.inf, 0.0]]).repeat(3, 1)
    u = torch.tensor([0.5 - 1e-12, 0.5, 1 - 1e-16], dtype=torch.float64)
    assert S.sample_tokens(masked, u, 1.0, 1.0).tolist() == [0, 2, 2]


def test_sample_seed_is_stable_and_distinct():
    assert S.sample_seed(0, "p", 1) == S.sample_seed(0, "p", 1)
    assert len({S.sample_seed(0, "p", 1), S.sample_seed(0, "p", 2), S.sample_seed(1, "p", 1),
                S.sample_seed(0, "q", 1)}) == 4
    assert 0 <= S.sample_seed(7, "x", 3) < 2**63


def test_cut_at_stop_drops_a_straddling_token_whole():
    table = {0: "hel", 1: "lo\n", 2: "wor", 3: "ld"}
    tok = SimpleNamespace(decode=lambda ids, **kw: "".join(table[i] for i in ids))
    assert S.cut_at_stop(tok, [0, 1, 2], ("\n",)) == ([0], "hel")
    assert S.cut_at_stop(tok, [0, 1, 2, 3], ("wor", "o\nw")) == ([0], "hel")
    assert S.cut_at_stop(tok, [0, 2], ("\n",)) is None


def test_config_validation_names_the_flag():
    for kw, flag in [({"n": 0}, "--n"), ({"temperature": -1}, "--temperature"),
                     ({"top_p": 0}, "--top-p"), ({"max_new_tokens": 0}, "--max-new-tokens"),
                     ({"batch_size": -1}, "--batch-size"), ({"stop": ("",)}, "--stop")]:
        with pytest.raises(LatentAuditError, match=flag):
            S.SampleConfig(**kw)
    assert S.SampleConfig(stop="\n").stop == ("\n",)


# ---- stop / EOS / length on a scripted model -------------------------------------------------

class _Cache:
    def __init__(self, lengths):
        self.lengths = lengths

    def batch_select_indices(self, idx):
        self.lengths = self.lengths[idx.cpu()]


class ScriptedLM(nn.Module):
    """Emits a fixed script per prompt (chosen by prompt length) as near one-hot logits, and
    checks the loop's bookkeeping (mask width and counts, positions) at every step."""

    def __init__(self, scripts: dict[int, list[int]]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.scripts = {n: list(s) for n, s in scripts.items()}
        self.generation_config = SimpleNamespace(eos_token_id=EOS)
        self.calls = 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None,
                use_cache=True, logits_to_keep=0):
        if past_key_values is None:
            past_key_values = _Cache(attention_mask.sum(1))
            past_key_values.width = 0
        cache = past_key_values
        cache.width += input_ids.shape[1]
        assert attention_mask.shape == (len(cache.lengths), cache.width)
        step = position_ids[:, -1] - (cache.lengths - 1)  # tokens generated so far
        assert (attention_mask.sum(1) == cache.lengths + step).all()
        logits = torch.full((len(step), 1, 264), -30.0)
        for b, (n, s) in enumerate(zip(cache.lengths.tolist(), step.tolist(), strict=True)):
            logits[b, 0, self.scripts[n][s]] = 30.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=cache)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_scripted_finish_reasons_and_ids(temperature):
    tok = tiny_tokenizer()
    prompts = [S.encode_prompt(tok, p, None) for p in ("a", "bb", "ccc")]
    n = [len(p) for p in prompts]

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    lm = ScriptedLM({n[0]: [*enc("hi!"), EOS, *enc("zzzz")], n[1]: enc("one\n\ntwo"),
                     n[2]: enc("abcdefghij")})
    loaded = prepare(lm, tok, name="scripted")
    out = S.generate(loaded, prompts, [1, 2, 3], cfg(temperature=temperature, max_new_tokens=6,
                                                      stop=("\n\n", "xyz")))
    assert out[0] == S.Generation([*enc("hi!"), EOS], "hi!", "eos")
    assert out[1] == S.Generation(enc("one"), "one", "stop")
    assert out[2] == S.Generation(enc("abcdef"), "abcdef", "length")
    assert lm.calls == 6  # rows leave the cache as they finish; the last one runs to the limit


# ---- the KV-cache loop against a full recompute ---------------------------------------------

def full_recompute_greedy(model, prompts: list[list[int]], steps: int, pad: int):
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        T = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (T - len(s)) + s for s in seqs])  # (B, T)
        mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])  # (B, T)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        for s, t in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_kv_cache_matches_full_recompute_and_hf_generate(arch):
    tok = tiny_tokenizer()
    loaded = prepare(tiny_model(arch, seed=3), tok, name=arch, device="cpu")
    loaded.model.generation_config.eos_token_id = 999  # never produced: run every step
    prompts = [S.encode_prompt(tok, p, None) for p in ("x", "a longer prompt here", "mid one")]
    steps = 12
    got = S.generate(loaded, prompts, [0, 0, 0], cfg(temperature=0, max_new_tokens=steps))
    ref = full_recompute_greedy(loaded.model, prompts, steps, tok.pad_token_id)
    for g, r in zip(got, ref, strict=True):
        expect = r[: r.index(EOS) + 1] if EOS in r else r  # the tokenizer's EOS still ends a row
        assert g.token_ids == expect
    hf = loaded.model.generate(torch.tensor([prompts[1]]), attention_mask=None, do_sample=False,
                               max_new_tokens=steps, eos_token_id=999, pad_token_id=0)
    assert got[1].token_ids == hf[0, len(prompts[1]):].tolist()[: len(got[1].token_ids)]


# ---- the driver: files, reproducibility, resuming --------------------------------------------

@pytest.fixture(scope="module")
def reference(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "completions.jsonl"
    return S.sample_completions(loaded, PROMPTS, cfg(), out)


def test_rows_hold_consistent_ids_text_and_meta(loaded, reference):
    tok = loaded.tokenizer
    got = rows(reference)
    assert [(r["prompt_id"], r["sample_index"]) for r in got] == [
        (p["prompt_id"], i) for p in PROMPTS for i in range(2)]
    for r in got:
        ids = r["completion_token_ids"]
        assert 0 < len(ids) <= 8 and r["finish_reason"] in S.FINISH_REASONS
        body = ids[:-1] if r["finish_reason"] == "eos" else ids
        assert EOS not in body and S.decode(tok, body) == r["completion"]
        assert r["finish_reason"] != "length" or len(ids) == 8
        assert r["meta"]["sampling"]["sample_seed"] == S.sample_seed(0, r["prompt_id"],
                                                                     r["sample_index"])
    p0, p1 = got[0], got[2]
    assert p0["meta"]["fact"] == "It is round." and p0["prompt"] == PROMPTS[0]["prompt"]
    assert p0["prompt_token_ids"] == tok("<|user|>Is the earth flat?\n<|assistant|>",
                                         add_special_tokens=False)["input_ids"]
    assert p1["prompt_token_ids"] == tok("<|system|>Be brief.\n<|user|>Hi\n<|assistant|>",
                                         add_special_tokens=False)["input_ids"]
    assert p1["meta"]["sampling"]["system"] == "Be brief."
    assert got[0]["completion"] != got[1]["completion"]  # samples of one prompt differ
    manifest = json.loads(S.manifest_path(reference).read_text())
    assert manifest["n"] == 2 and manifest["temperature"] == 1.0 and manifest["n_prompts"] == 3


def test_same_seed_same_file_other_seed_other_file(loaded, reference, tmp_path):
    again = S.sample_completions(loaded, PROMPTS, cfg(), tmp_path / "a.jsonl")
    other = S.sample_completions(loaded, PROMPTS, cfg(seed=1), tmp_path / "b.jsonl")
    assert again.read_bytes() == reference.read_bytes()
    assert other.read_bytes() != reference.read_bytes()


@pytest.mark.parametrize("batch_size", [1, 5])
def test_batch_size_does_not_change_the_file(loaded, reference, tmp_path, batch_size):
    out = S.sample_completions(loaded, PROMPTS, cfg(batch_size=batch_size), tmp_path / "c.jsonl")
    assert out.read_bytes() == reference.read_bytes()


def test_resume_after_a_crash_mid_run(loaded, reference, tmp_path, monkeypatch):
    real, calls = S.generate, []

    def crashing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kw)

    monkeypatch.setattr(S, "generate", crashing)
    out = tmp_path / "c.jsonl"
    with pytest.raises(RuntimeError):
        S.sample_completions(loaded, PROMPTS, cfg(batch_size=3), out)
    assert len(rows(out)) == 3  # the first batch is on disk
    monkeypatch.setattr(S, "generate", real)
    S.sample_completions(loaded, PROMPTS, cfg(batch_size=3), out)
    assert out.read_bytes() == reference.read_bytes()


def test_resume_drops_a_torn_last_line(loaded, reference, tmp_path):
    data = reference.read_bytes()
    cut = data.index(b"\n", data.index(b"\n") + 1) + 40  # 40 bytes into the third line
    out = tmp_path / "c.jsonl"
    out.write_bytes(data[:cut])
    S.manifest_path(out).write_bytes(S.manifest_path(reference).read_bytes())
    S.sample_completions(loaded, PROMPTS, cfg(), out)
    assert out.read_bytes() == data


def test_n_may_grow_on_resume(loaded, reference, tmp_path):
    out = tmp_path / "c.jsonl"
    S.sample_completions(loaded, PROMPTS, cfg(n=1), out)
    S.sample_completions(loaded, PROMPTS, cfg(n=2), out)
    assert sorted(out.read_text().splitlines()) == sorted(reference.read_text().splitlines())
    with pytest.raises(LatentAuditError, match="may grow"):
        S.sample_completions(loaded, PROMPTS, cfg(n=1), out)


def test_resume_with_other_parameters_is_an_error(loaded, reference, tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_bytes(reference.read_bytes())
    S.manifest_path(out).write_bytes(S.manifest_path(reference).read_bytes())
    with pytest.raises(LatentAuditError, match="temperature=1.0.*temperature=0.5.*--out"):
        S.sample_completions(loaded, PROMPTS, cfg(temperature=0.5), out)
    with pytest.raises(LatentAuditError, match="the prompts"):
        S.sample_completions(loaded, PROMPTS[:2], cfg(), out)
    S.manifest_path(out).unlink()
    with pytest.raises(LatentAuditError, match="manifest"):
        S.sample_completions(loaded, PROMPTS, cfg(), out)
    assert out.read_bytes() == reference.read_bytes()  # nothing was touched


def test_stop_strings_cut_the_unstopped_completion(loaded, reference, tmp_path):
    tok = loaded.tokenizer
    full = rows(reference)
    # stop at characters that occur a few tokens into the unstopped completions
    stops = tuple(sorted({r["completion"][3] for r in full if len(r["completion"]) > 3}))[:4]
    got = rows(S.sample_completions(loaded, PROMPTS, cfg(stop=stops), tmp_path / "s.jsonl"))
    assert sum(r["finish_reason"] == "stop" for r in got) >= 2
    for r, f in zip(got, full, strict=True):
        ids, text, full_text = r["completion_token_ids"], r["completion"], f["completion"]
        assert f["completion_token_ids"][: len(ids)] == ids  # same draws up to the cut
        assert not any(s in text for s in stops)
        if r["finish_reason"] == "stop":
            assert S.decode(tok, ids) == text and len(ids) < len(f["completion_token_ids"])
            first = min(i for i in (full_text.find(s) for s in stops) if i >= 0)
            assert full_text[:first].startswith(text)
        else:
            assert r == {**f, "meta": r["meta"]}


# ---- prompts files and the command line ------------------------------------------------------

def test_read_prompts_files_and_suites(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\nfirst prompt\n", encoding="utf-8")
    with pytest.raises(LatentAuditError, match=r"p.txt:4: prompt_id 'first prompt' repeats .*:1"):
        S.read_prompts(txt)
    txt.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    assert [(p.prompt_id, p.prompt) for p in S.read_prompts(txt)] == [
        ("first prompt", "first prompt"), ("second prompt", "second prompt")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps(PROMPTS[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(LatentAuditError, match=r"p.jsonl:2: not valid JSON"):
        S.read_prompts(jsonl)
    jsonl.write_text(json.dumps(PROMPTS[0]) + "\n", encoding="utf-8")
    (p,) = S.read_prompts(jsonl)
    assert (p.prompt_id, p.prompt, p.meta) == ("p0", PROMPTS[0]["prompt"], {"fact": "It is round."})
    with pytest.raises(LatentAuditError, match="no-such-file"):
        S.read_prompts(tmp_path / "no-such-file.jsonl")
    suite = S.read_prompts("false-belief")
    assert len(suite) > 5 and all(isinstance(p.meta.get("fact"), str) for p in suite)
    listed = S.read_prompts(["a", {"prompt_id": "b", "prompt": "x", "topic": "t"}])
    assert [(p.prompt_id, p.meta) for p in listed] == [("a", {}), ("b", {"topic": "t"})]
    with pytest.raises(LatentAuditError, match=r"prompt #1: field 'prompt'"):
        S.read_prompts(["a", {"prompt": 3}])


def test_cli_sample(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]), encoding="utf-8")
    out = tmp_path / "c.jsonl"
    argv = ["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out",
            str(out), "--n", "2", "--max-new-tokens", "6", "--stop", "\\n", "--device", "cpu"]
    assert main(argv) == 0
    assert "4 completions" in capsys.readouterr().out
    got = rows(out)
    assert len(got) == 4 and got[0]["meta"]["fact"] == "It is round."
    assert json.loads(S.manifest_path(out).read_text())["stop"] == ["\n"]
    assert main(argv) == 0 and len(rows(out)) == 4  # a rerun has nothing left to do
    assert main([*argv, "--temperature", "-1"]) == 2
    assert "--temperature must be ≥ 0" in capsys.readouterr().err


@pytest.fixture
def no_model_loads(monkeypatch):
    from latentaudit.models import load

    calls = []
    monkeypatch.setattr(load, "load_model", lambda name, **kw: calls.append(name) or 1 / 0)
    return calls


@pytest.mark.parametrize(("flags", "error"), [
    ([], "prompts.jsonl:3: field 'prompt' is required"),
    (["--prompts", "no-such-suite"], "no such prompts file and no built-in suite"),
    (["--dtype", "int3"], "--dtype 'int3' is not one of"),
    (["--device", "toaster"], "--device 'toaster' is not a device"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
])
def test_sample_checks_every_input_before_loading_a_model(tmp_path, capsys, no_model_loads,
                                                          flags, error):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]) + '{"prompt": 3}\n',
                       encoding="utf-8")
    argv = ["sample", "--model", "m", "--prompts", str(prompts), "--out",
            str(tmp_path / "c.jsonl"), *flags]
    assert main(argv) == 2
    assert error in capsys.readouterr().err
    assert no_model_loads == []


@pytest.mark.parametrize(("flags", "error"), [
    (["--temperature", "0.5"], "sampled with temperature=1.0, this run differs"),
    (["--model", "another-model"], "sampled with model="),
    (["--dtype", "bf16"], "sampled with dtype='float32', this run differs (dtype='bfloat16')"),
    (["--n", "1"], "--n may grow when resuming but not shrink"),
])
def test_sample_checks_a_resume_before_loading_a_model(tmp_path, capsys, reference,
                                                       tiny_model_dir, no_model_loads, flags,
                                                       error):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "c.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    out.write_bytes(reference.read_bytes())
    S.manifest_path(out).write_bytes(S.manifest_path(reference).read_bytes())
    argv = ["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out",
            str(out), "--n", "2", "--max-new-tokens", "8", "--batch-size", "4"]
    assert main(argv) == 0  # the same parameters: all done already, nothing to load
    assert "6 completions" in capsys.readouterr().out
    assert main([*argv, *flags]) == 2
    assert error in capsys.readouterr().err
    assert no_model_loads == [] and out.read_bytes() == reference.read_bytes()
