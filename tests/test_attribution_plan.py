"""What attribution decides before the batch loop: inputs checked before the model loads, the one
layer rule, the checkpoint schedule, and the public name ``latentaudit.attribute``."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict

import pytest
import torch

import latentaudit as la
import latentaudit.attribution.accumulate as accumulate
import latentaudit.models.load as model_load
from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.attribution.plan import check_inputs, saes_by_layer
from latentaudit.errors import LatentAuditError
from latentaudit.saes import load_sae
from test_attribute import loaded, make_data
from tiny import random_sae


def write_data(path, rows=None):
    rows = rows if rows is not None else [
        {k: v for k, v in asdict(c).items() if k in ("prompt", "completion", "label", "prompt_id")}
        for c in make_data()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sae_folder(folder, layer=None, **cfg_fields):
    """A saved random SAE (d_model 32) whose cfg.json gets ``cfg_fields`` written into it."""
    random_sae(32, 16, layer=layer).save(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **cfg_fields}))
    return folder


@pytest.fixture
def loads(monkeypatch):
    """Calls of load_model (each still loads for real)."""
    calls, real = [], model_load.load_model

    def recording(name, *args, **kw):
        calls.append(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(model_load, "load_model", recording)
    return calls


# -- inputs before the model ------------------------------------------------------------------

def test_bad_data_fails_before_the_model_loads(tmp_path, loads):
    bad = write_data(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b", "label": "yes"}])
    sae = sae_folder(tmp_path / "sae", layer=1)
    with pytest.raises(LatentAuditError, match=rf"{bad}:1: field 'label'"):
        attribute(str(tmp_path / "no-such-model"), str(sae), bad)
    with pytest.raises(LatentAuditError, match="no pairs"):
        attribute(str(tmp_path / "no-such-model"), str(sae),
                  write_data(tmp_path / "one.jsonl", [{"prompt": "a", "completion": "b",
                                                       "label": "positive"}]))
    assert loads == []


def test_bad_sae_and_options_fail_before_the_model_loads(tmp_path, loads):
    data = write_data(tmp_path / "data.jsonl")
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(LatentAuditError, match="no-sae does not exist"):
        attribute(missing, str(tmp_path / "no-sae"), data)
    with pytest.raises(LatentAuditError, match="does not record its layer"):
        attribute(missing, str(sae_folder(tmp_path / "s0")), data)
    with pytest.raises(LatentAuditError, match="stores no mean activation"):
        attribute(missing, random_sae(32, 8, layer=1, mean=False), data,
                  AttributionConfig(abar="sae"))
    with pytest.raises(LatentAuditError, match="--device 'zero' is not a device"):
        attribute(missing, str(sae_folder(tmp_path / "s1", layer=1)), data, device="zero")
    with pytest.raises(LatentAuditError, match="--dtype 'fp8'"):
        attribute(missing, str(sae_folder(tmp_path / "s2", layer=1)), data, dtype="fp8")
    assert loads == []
    with pytest.raises(LatentAuditError, match="no such file or folder"):  # only now the model
        attribute(missing, str(sae_folder(tmp_path / "s3", layer=1)), data)
    assert loads == [missing]


def test_paths_all_the_way_load_the_model_last(tiny_model_dir, tmp_path, loads):
    data = write_data(tmp_path / "data.jsonl")
    sae = sae_folder(tmp_path / "sae", layer=1)
    result = attribute(str(tiny_model_dir), str(sae), data, AttributionConfig(batch_size=4),
                       device="cpu")
    assert loads == [str(tiny_model_dir)]
    assert list(result.layers) == [1] and result.n_pairs == 6
    assert result.dataset["path"] == str(data) and len(result.dataset["sha256"]) == 64
    assert result.model.d_model == 32 and result.model.dtype == "float32"
    assert len(result.ranking) == 16 and [r.rank for r in result.ranking] == list(range(1, 17))
    assert result.ranking[0].latent == result.layers[1].top(1)[0]


def test_a_chat_prompt_without_a_template_names_the_line(tmp_path):
    from latentaudit.attribution.plan import make_plan
    from tiny import tiny_tokenizer

    plain = tiny_tokenizer.__wrapped__()
    plain.chat_template = None
    data = write_data(tmp_path / "d.jsonl")  # lines 9 and 10 hold chat messages
    inputs = check_inputs(random_sae(32, 8, layer=0), data, None, AttributionConfig())
    with pytest.raises(LatentAuditError, match=rf"{data}:9: The prompt is a list of chat"):
        make_plan(inputs, plain, None, 4)


# -- the one layer rule -----------------------------------------------------------------------

def test_layer_rule_recorded_explicit_and_clashes():
    a, b = random_sae(32, 8, layer=1), random_sae(32, 8, layer=None)
    assert saes_by_layer([a], None) == {1: a}
    assert saes_by_layer([a, b], [1, 0]) == {0: b, 1: a}
    assert saes_by_layer([b], 3) == {3: b}
    with pytest.raises(LatentAuditError, match="does not record its layer.*--layer"):
        saes_by_layer([b], None)
    with pytest.raises(LatentAuditError, match="1 SAE.* but 2 layer"):
        saes_by_layer([b], [3, 5])
    with pytest.raises(LatentAuditError, match="trained on layer 1.*layer 0 was requested"):
        saes_by_layer([a], 0)
    with pytest.raises(LatentAuditError, match="--layer 2 is given twice"):
        saes_by_layer([b, random_sae(32, 8)], [2, 2])
    with pytest.raises(LatentAuditError, match="not a layer"):
        saes_by_layer([b], -1)
    with pytest.raises(LatentAuditError, match="either"):
        check_inputs({1: a}, make_data(), 1, AttributionConfig())


@pytest.mark.parametrize("field", ["layer", "layers"])
def test_a_multi_layer_sae_needs_an_explicit_layer(tmp_path, field):
    folder = sae_folder(tmp_path / "sae", **{field: [3, 5]})
    sae = load_sae(folder)
    with pytest.raises(LatentAuditError) as err:
        saes_by_layer([sae], None)
    assert str(err.value) == (f"{folder / 'cfg.json'}: field '{field}' lists several layers "
                              "(3, 5): pass --layer with the one to read.")
    assert saes_by_layer([sae], 5) == {5: sae}
    with pytest.raises(LatentAuditError, match=f"layer 3, 5 \\(field '{field}'\\).*layer 4"):
        saes_by_layer([sae], 4)


def test_library_and_explicit_layers_agree():
    lm = loaded()
    sae = random_sae(32, 12, layer=None).double()
    by_kw = attribute(lm, sae, make_data(), layers=1).layers[1]
    by_dict = attribute(lm, {1: sae}, make_data()).layers[1]
    torch.testing.assert_close(by_kw.delta_attribution, by_dict.delta_attribution)


# -- checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize(("batches", "seconds", "saved"), [
    (2, 0, [2, 4, 5]),     # 10 completions in batches of 2: every 2nd batch, then the end
    (0, 150, [2, 4, 5]),   # the clock moves 100 s per reading: every other batch
    (0, 0, []),            # both off: no checkpoint at all
])
def test_checkpoint_schedule(tmp_path, monkeypatch, batches, seconds, saved):
    clock = iter(range(100, 10**6, 100))
    monkeypatch.setattr(accumulate, "monotonic", lambda: next(clock))
    done = []
    monkeypatch.setattr(accumulate, "_save_checkpoint", lambda path, key, n, *a: done.append(n))
    cfg = AttributionConfig(batch_size=2, checkpoint_every_batches=batches,
                            checkpoint_every_seconds=seconds)
    attribute(loaded(dtype=torch.float32), random_sae(32, 8, layer=1), make_data(), cfg,
              checkpoint=tmp_path / "ckpt.safetensors")
    assert done == saved


def test_bad_option_values_name_the_flag():
    for kw, flag in [({"checkpoint_every_batches": -1}, "--checkpoint-every-batches"),
                     ({"checkpoint_every_seconds": -0.5}, "--checkpoint-every-seconds"),
                     ({"batch_size": -1}, "--batch-size"), ({"pairing": "some"}, "--pairing"),
                     ({"top_k": "ten"}, "--top-k")]:
        with pytest.raises(LatentAuditError, match=flag):
            AttributionConfig(**kw)


# -- the public name ----------------------------------------------------------------------------

def test_la_attribute_is_always_the_function():
    import latentaudit.attribution  # noqa: F401  (what used to turn la.attribute into a module)

    la.AttributionConfig, la.load_sae, la.load_model  # noqa: B018
    assert callable(la.attribute) and la.attribute is attribute
    clashes = [name for name in la.__all__
               if importlib.util.find_spec(f"latentaudit.{name}") is not None]
    assert clashes == []
