"""Model loading and the hook mechanism on tiny models built from a config."""

from __future__ import annotations

import pytest
import torch

from latentaudit.errors import LatentAuditError
from latentaudit.models.hooks import (
    LAYER_PATHS,
    capture_resid,
    layer_list,
    layer_module,
    resid_hooks,
    run_until,
)
from latentaudit.models.load import load_model, parse_dtype, resolve_device
from tiny import tiny_model

ARCHS = ["llama", "qwen2", "gemma", "gpt2", "gpt_neox"]


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_list_and_resid_post_equal_hidden_states(arch):
    model = tiny_model(arch, layers=3)
    assert len(layer_list(model)) == 3
    ids = torch.randint(0, 250, (2, 9))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    before = n_hooks(model)  # transformers keeps hooks of its own
    got = run_until(model, [0, 1], input_ids=ids)
    # resid_post of layer L is hidden_states[L + 1] (the last one has the final norm applied)
    torch.testing.assert_close(got[0], hs[1])
    torch.testing.assert_close(got[1], hs[2])
    assert n_hooks(model) == before


def test_table_beats_the_generic_search():
    model = tiny_model("gpt2", layers=2)
    assert model.config.model_type in LAYER_PATHS
    assert layer_list(model) is model.transformer.h


def test_hooks_are_removed_even_after_an_error():
    model = tiny_model("llama", layers=2)
    before = n_hooks(model)
    with pytest.raises(RuntimeError), resid_hooks(model, {0: lambda h: h, 1: lambda h: None}):
        assert n_hooks(model) == before + 2
        raise RuntimeError("boom")
    assert n_hooks(model) == before
    with capture_resid(model, [1]):
        pass
    assert n_hooks(model) == before


def test_replacing_the_output_changes_what_later_layers_see():
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 250, (1, 5))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with resid_hooks(model, {0: lambda h: h + 0.0}):
            same = model(input_ids=ids).logits
        with resid_hooks(model, {0: lambda h: h * 0.0}):
            changed = model(input_ids=ids).logits
    torch.testing.assert_close(same, base)
    assert not torch.allclose(changed, base)


def test_layer_out_of_range_is_a_clear_error():
    model = tiny_model("llama", layers=2)
    with pytest.raises(LatentAuditError, match="--layer 5 is out of range.*0..1"):
        layer_module(model, 5)


def test_load_model_from_a_local_folder(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.padding_side == "left" and lm.d_model == 32


def test_bad_model_dtype_and_device_are_clear_errors(tmp_path):
    with pytest.raises(LatentAuditError, match="no such file or folder"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(LatentAuditError, match="--dtype 'fp8'"):
        parse_dtype("fp8")
    if not torch.cuda.is_available():
        with pytest.raises(LatentAuditError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(LatentAuditError, match="--dtype '3' is not one of"):
        parse_dtype(3)


@pytest.mark.parametrize(("value", "message"), [
    ("zero", "--device 'zero' is not a device: use auto, cpu, cuda, cuda:N, mps or auto-map."),
    ("cuda:x", "--device 'cuda:x' is not a device: use auto, cpu, cuda, cuda:N, mps or auto-map."),
    ("CPU", "--device 'CPU' is not a device: use auto, cpu, cuda, cuda:N, mps or auto-map."),
    ("meta", "--device 'meta' is not supported: use auto, cpu, cuda, cuda:N, mps or auto-map."),
])
def test_every_bad_device_is_one_clear_error(value, message):
    with pytest.raises(LatentAuditError) as err:
        resolve_device(value)
    assert str(err.value) == message


def test_devices_that_this_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LatentAuditError, match=r"--device cuda:7 was requested but CUDA is not "
                                               r"available on this machine: use --device cpu"):
        resolve_device("cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LatentAuditError, match="--device cuda:7: this machine has 1 CUDA "
                                               "device.*numbered 0 to 0"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(LatentAuditError, match="MPS is not available"):
        resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")


def test_bf16_attribution_is_close_to_fp32():
    from latentaudit.attribution import AttributionConfig, attribute
    from latentaudit.models.load import prepare
    from test_attribute import make_data
    from tiny import random_sae, tiny_tokenizer

    sae = random_sae(32, 64, layer=1)
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        lm = prepare(tiny_model("llama", layers=3, dtype=dtype), tiny_tokenizer(), name="t")
        res[dtype] = attribute(lm, sae, make_data(), AttributionConfig(batch_size=4)).layers[1]
    a, b = res[torch.float32].delta_attribution, res[torch.bfloat16].delta_attribution
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95


def test_coder_alias_names_the_default_model(monkeypatch, tmp_path):
    """The alias that says "Coder" resolves to the same entry, cache and shipped SAE, and the
    loaded model records the registry's short name."""
    from latentaudit.models import embedded
    from latentaudit.models import load as load_mod
    from latentaudit.saes.shipped import default_sae_path, resolve_sae_path

    alias = "qwen2.5-coder-0.5b-instruct"
    assert embedded.get(alias) is embedded.get(embedded.DEFAULT_MODEL)
    assert "Coder" in embedded.get(alias).description
    assert default_sae_path(alias) == default_sae_path(embedded.DEFAULT_MODEL)
    assert resolve_sae_path("default", alias) == str(default_sae_path(embedded.DEFAULT_MODEL))
    seen = []
    monkeypatch.setattr(embedded, "embedded_path", lambda name: seen.append(name) or tmp_path)
    assert load_mod.resolve_model_path(alias) == str(tmp_path)
    assert seen == [embedded.DEFAULT_MODEL]
