"""Fine-tuning and adapters: the assistant mask, exact resume, adapter loading against a hand
merge, and one clear error per bad input before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentaudit.errors import LatentAuditError
from latentaudit.finetune import FinetuneConfig, finetune
from latentaudit.finetune import train as ft_train
from latentaudit.finetune.chat import read_chat, tokenize_chat
from latentaudit.finetune.train import collate, masked_loss
from tiny import save_tiny, tiny_tokenizer

pytest.importorskip("peft")


def _chat(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _write_chat(path: Path, n: int = 12) -> Path:
    rows = [{"messages": _chat(f"count to {i}", " ".join(str(j) for j in range(i + 2)))}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ft") / "base")


def test_mask_covers_exactly_the_assistant_text():
    tok = tiny_tokenizer()
    # the tiny template: "<|user|>ab\n<|assistant|>cd\n"; byte-level, one token per byte
    t = tokenize_chat(tok, _chat("ab", "cd"), 100)
    text = tok.decode(t.input_ids)
    assert text == "<|user|>ab\n<|assistant|>cd\n"
    assert [tok.decode([i]) for i, m in zip(t.input_ids, t.target, strict=True) if m] == \
        ["c", "d", "\n"]


def test_mask_of_two_turns_and_system():
    tok = tiny_tokenizer()
    msgs = [{"role": "system", "content": "S"}, *_chat("q1", "A1"), *_chat("q2", "B2")]
    t = tokenize_chat(tok, msgs, 200)
    kept = "".join(tok.decode([i]) for i, m in zip(t.input_ids, t.target, strict=True) if m)
    assert kept == "A1\nB2\n"


def test_loss_is_the_mean_over_assistant_tokens_only():
    tok = tiny_tokenizer()
    rows = [tokenize_chat(tok, _chat("ab", "cd"), 100), tokenize_chat(tok, _chat("xyz", "w"), 100)]
    batch = collate(rows, pad_id=258)
    logits = torch.randn(*batch.input_ids.shape, 264, generator=torch.Generator().manual_seed(0))
    terms = []
    for b, r in enumerate(rows):
        for t in range(1, len(r.input_ids)):
            if r.target[t]:
                terms.append(-torch.log_softmax(logits[b, t - 1], -1)[r.input_ids[t]])
    assert len(terms) == 3 + 2
    assert torch.allclose(masked_loss(logits, batch.labels), torch.stack(terms).mean())


def test_cut_to_max_length_and_rows_without_targets_are_dropped():
    tok = tiny_tokenizer()
    assert tokenize_chat(tok, _chat("a" * 50, "b"), 20) is None
    t = tokenize_chat(tok, _chat("a", "b" * 50), 30)
    assert len(t.input_ids) == 30 and sum(t.target) == 30 - len("<|user|>a\n<|assistant|>")


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(base, tmp_path, monkeypatch):
    data = _write_chat(tmp_path / "chat.jsonl")
    cfg = FinetuneConfig(rank=2, batch_size=4, epochs=2, checkpoint_every=2, lr=5e-3,
                         dropout=0.1, warmup_steps=1)
    whole = finetune(str(base), data, tmp_path / "whole", cfg, device="cpu")
    real_step, calls = ft_train.train_step, []

    def dying_step(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kw)

    monkeypatch.setattr(ft_train, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(base), data, tmp_path / "killed", cfg, device="cpu")
    record = json.loads((tmp_path / "killed" / "checkpoint" / "checkpoint.json").read_text())
    assert record["step"] == 4
    monkeypatch.setattr(ft_train, "train_step", real_step)
    resumed = finetune(str(base), data, tmp_path / "killed", cfg, device="cpu")
    a, b = _adapter_tensors(whole), _adapter_tensors(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((resumed / "finetune.json").read_text())
    assert card["steps"] == 6 and len(card["losses"]) == 6
    assert not (resumed / "checkpoint").exists()
    assert json.loads((whole / "finetune.json").read_text())["losses"] == card["losses"]


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    data = _write_chat(tmp / "chat.jsonl")
    cfg = FinetuneConfig(rank=4, alpha=8, batch_size=4, epochs=2, lr=2e-2, warmup_steps=0)
    return finetune(str(base), data, tmp / "adapter", cfg, device="cpu")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_loads_as_the_hand_merged_weights(base, trained):
    from latentaudit.models.load import load_model

    ids = torch.tensor([[1, 5, 9, 40, 77, 3, 120]])
    plain = load_model(str(base), device="cpu")
    adapted = load_model(str(trained), device="cpu")
    assert adapted.adapter["base"] == str(base) and adapted.adapter["merged"]
    cfg = json.loads((trained / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    by_hand = load_model(str(base), device="cpu").model
    lora = _adapter_tensors(trained)
    params = dict(by_hand.named_parameters())
    n = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        with torch.no_grad():
            params[f"{module}.weight"] += scale * b @ a  # W + (alpha / r) B A
        n += 1
    assert n > 0
    assert torch.allclose(_logits(adapted.model, ids), _logits(by_hand, ids), atol=1e-5)
    assert not torch.allclose(_logits(adapted.model, ids), _logits(plain.model, ids), atol=1e-3)


def test_base_plus_adapter_and_explicit_adapter_give_the_same_model(base, trained):
    from latentaudit.models.load import load_model

    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    one = load_model(f"{base}+{trained}", device="cpu")
    two = load_model(str(base), adapter=str(trained), device="cpu")
    assert one.name == f"{base}+{trained}"
    assert torch.equal(_logits(one.model, ids), _logits(two.model, ids))
    peft = pytest.importorskip("peft")
    unmerged = peft.PeftModel.from_pretrained(load_model(str(base), device="cpu").model,
                                              str(trained))
    assert torch.allclose(_logits(unmerged, ids), _logits(one.model, ids), atol=1e-5)


@pytest.fixture()
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test."""
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_missing_adapter_config_is_one_error(base, tmp_path, no_weights):
    from latentaudit.models.load import load_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentAuditError, match="no adapter_config.json"):
        load_model(f"{base}+{tmp_path / 'empty'}", device="cpu")


def test_base_mismatch_is_one_error(trained, tmp_path, no_weights):
    from latentaudit.models.load import load_model

    other = save_tiny(tmp_path / "other")
    with pytest.raises(LatentAuditError, match="made for base model"):
        load_model(f"{other}+{trained}", device="cpu")


def test_adapter_for_another_architecture_is_one_error(trained, tmp_path, no_weights):
    import shutil

    from latentaudit.models.load import load_model

    gpt2 = save_tiny(tmp_path / "gpt2", arch="gpt2")
    copy = tmp_path / "adapter"
    shutil.copytree(trained, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(gpt2)
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LatentAuditError, match="another architecture"):
        load_model(str(copy), device="cpu")
    wide = save_tiny(tmp_path / "wide", d_model=64)
    cfg["base_model_name_or_path"] = str(wide)
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LatentAuditError, match="another architecture or size"):
        load_model(str(copy), device="cpu")


def test_pickled_adapter_weights_are_refused(trained, tmp_path, no_weights):
    import shutil

    from latentaudit.models.load import load_model

    copy = tmp_path / "pickled"
    shutil.copytree(trained, copy)
    (copy / "adapter_model.safetensors").rename(copy / "adapter_model.bin")
    with pytest.raises(LatentAuditError, match="convert it to safetensors"):
        load_model(str(copy), device="cpu")


@pytest.mark.parametrize(("line", "problem"), [
    ("{not json", "not valid JSON"),
    ('{"text": "hi"}', "must be an object with 'messages'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"messages\[0\]\.role"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"messages\[0\]\.content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
])
def test_malformed_chat_rows_name_file_and_line(base, tmp_path, line, problem, no_weights):
    good = json.dumps({"messages": _chat("a", "b")})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(LatentAuditError, match=rf"bad\.jsonl:2: .*{problem}"):
        read_chat(path)
    with pytest.raises(LatentAuditError, match=problem):
        finetune(str(base), path, tmp_path / "out", device="cpu")


def test_a_finished_folder_is_kept_and_another_runs_is_refused(base, trained, tmp_path):
    card = json.loads((trained / "finetune.json").read_text())
    cfg = FinetuneConfig(**card["config"])
    data = Path(card["data"])
    assert finetune(str(base), data, trained, cfg, device="cpu") == trained
    with pytest.raises(LatentAuditError, match="another config"):
        finetune(str(base), data, trained, FinetuneConfig(rank=3), device="cpu")


def test_cli_finetune_writes_the_adapter_and_card(base, tmp_path):
    from latentaudit.cli import main

    data = _write_chat(tmp_path / "chat.jsonl", n=4)
    out = tmp_path / "cli"
    assert main(["finetune", "--model", str(base), "--data", str(data), "--out", str(out),
                 "--rank", "2", "--batch-size", "2", "--device", "cpu"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "finetune.json",
            "README.md"} <= names
    card = json.loads((out / "finetune.json").read_text())
    assert card["steps"] == 2 and card["config"]["rank"] == 2 and card["rows"] == 4
    assert card["base_model"] == str(base)


def test_attribution_on_an_adapter_reads_the_adapted_model(base, trained, tmp_path):
    """`attribute --model BASE+ADAPTER` records the adapter and its digest, and its Δ vectors
    differ from the base model's (the hook reads the adapted residual stream)."""
    from safetensors.torch import load_file

    from latentaudit.cli import main
    from tiny import random_sae

    example = Path(__file__).parents[1] / "examples" / "false-belief-small.jsonl"
    sae = tmp_path / "sae"
    random_sae(32, 64, layer=1).save(sae)
    runs = {}
    for tag, model in (("base", [str(base)]), ("adapted", [f"{base}+{trained}"]),
                       ("flag", [str(base), "--adapter", str(trained)])):
        out = tmp_path / tag
        assert main(["attribute", "--model", *model, "--sae", str(sae), "--data", str(example),
                     "--out", str(out), "--batch-size", "8", "--device", "cpu"]) == 0
        runs[tag] = (json.loads((out / "manifest.json").read_text()),
                     load_file(out / "attribution.safetensors"))
    manifest, tensors = runs["adapted"]
    adapter = manifest["model"]["adapter"]
    assert adapter["base"] == str(base) and adapter["adapter"] == str(trained)
    from latentaudit._io import sha256_file

    assert adapter["adapter_sha256"] == sha256_file(trained / "adapter_model.safetensors")
    assert "adapter" not in runs["base"][0]["model"]
    assert not torch.allclose(tensors["delta_attribution"],
                              runs["base"][1]["delta_attribution"])
    assert torch.equal(tensors["delta_attribution"], runs["flag"][1]["delta_attribution"])
    assert runs["flag"][0]["model"]["adapter"]["adapter_sha256"] == adapter["adapter_sha256"]


@pytest.mark.parametrize(("options", "problem"), [
    ({"rank": 0}, "--rank must be a whole number ≥ 1"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"dropout": 1.0}, "--dropout must be below 1"),
    ({"target_modules": " , "}, "--target-modules is empty"),
    ({"warmup_steps": -1}, "--warmup-steps must be a whole number ≥ 0"),
])
def test_bad_options_name_their_flag(options, problem):
    with pytest.raises(LatentAuditError, match=problem):
        FinetuneConfig(**options)


def test_adapter_flag_without_a_model_is_one_error(trained, capsys):
    from latentaudit.cli import main

    assert main(["explain", "--from", "RUN", "--adapter", str(trained)]) == 2
    assert "--adapter needs --model BASE" in capsys.readouterr().err


def test_an_organism_name_missing_from_the_install_is_one_error(tmp_path, monkeypatch):
    from latentaudit.models import adapters

    monkeypatch.setattr(adapters, "ORGANISM_ROOT", tmp_path)
    with pytest.raises(LatentAuditError, match="not shipped in this install"):
        adapters.parse_model_spec("qwen2.5-0.5b-instruct-insecure")
    folder = tmp_path / "qwen2.5-0.5b-instruct-insecure"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "qwen2.5-0.5b-instruct"}))
    spec = adapters.parse_model_spec("qwen2.5-0.5b-instruct-insecure")
    assert spec.base == "qwen2.5-0.5b-instruct" and spec.adapter == folder
    assert spec.name == "qwen2.5-0.5b-instruct-insecure"


def test_an_adapter_by_hub_id_is_read_from_the_hub_cache_offline(base, trained, tmp_path,
                                                                 monkeypatch):
    """A hub id loads like a local folder: laid out as huggingface_hub lays out its cache, read
    with the hub offline, and recorded with its repo and revision."""
    import shutil

    from latentaudit.models.load import load_model

    snap = tmp_path / "hub" / "models--org--tiny-adapter" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained / name, snap / name)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the environment, as read at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    hub = load_model(f"{base}+org/tiny-adapter", device="cpu")
    local = load_model(f"{base}+{trained}", device="cpu")
    assert torch.equal(_logits(hub.model, ids), _logits(local.model, ids))
    assert hub.adapter["repo"] == "org/tiny-adapter" and hub.adapter["revision"] == "0123abcd"
    with pytest.raises(LatentAuditError, match="the hub could not give it"):
        load_model(f"{base}+org/absent", device="cpu")


@pytest.mark.embedded
@pytest.mark.parametrize("name", ["qwen2.5-0.5b-instruct-insecure", "qwen2.5-0.5b-instruct-secure"])
def test_a_shipped_organism_loads_by_its_short_name(name):
    """A shipped organism is a small LoRA adapter of the default model with its card, and it
    changes the model."""
    from latentaudit.models import adapters, embedded
    from latentaudit.models.load import load_model

    folder = adapters.ORGANISM_ROOT / name
    if not (folder / "adapter_config.json").is_file():
        pytest.skip(f"{name} is not shipped in this checkout")
    if not (embedded.is_cached("qwen2.5-0.5b-instruct")
            or embedded.is_installed("qwen2.5-0.5b-instruct")):
        pytest.skip("the default model is not installed")
    assert (folder / "adapter_model.safetensors").stat().st_size <= 20 * 10**6
    card = json.loads((folder / "finetune.json").read_text())
    assert card["base_model"] == "qwen2.5-0.5b-instruct" and card["steps"] > 0
    lm = load_model(name, device="cpu")
    assert lm.name == name and lm.adapter["base"] == "qwen2.5-0.5b-instruct"
    base = load_model("qwen2.5-0.5b-instruct", device="cpu")
    ids = torch.tensor([base.tokenizer.encode("def read_file(name):\n    return open(")])
    assert not torch.allclose(_logits(lm.model, ids), _logits(base.model, ids), atol=1e-3)


def test_the_default_sae_of_an_adapter_is_its_base_models(trained):
    """`--sae default` on an organism or an adapter folder is the base model's shipped SAE
    (it reads the adapted residual stream); a base without one is named in the error."""
    from latentaudit.models import adapters
    from latentaudit.saes.shipped import SHIPPED_DIR, default_sae_path

    folder = adapters.ORGANISM_ROOT / "qwen2.5-0.5b-instruct-insecure"
    if (folder / "adapter_config.json").is_file():
        assert default_sae_path(folder.name) == SHIPPED_DIR / "qwen2.5-0.5b-instruct"
        assert default_sae_path(str(folder)) == SHIPPED_DIR / "qwen2.5-0.5b-instruct"
    with pytest.raises(LatentAuditError, match="ships no SAE for model"):
        default_sae_path(str(trained))  # a tiny base: no shipped SAE
