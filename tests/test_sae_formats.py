"""SAE format loaders: each format is written the way its library writes it, loaded, and its
encode/decode checked against that library's forward pass written out by hand."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from latentaudit.cli import main
from latentaudit.errors import LatentAuditError, ShapeMismatchError
from latentaudit.saes import load_sae
from latentaudit.saes.formats import detect_format
from tiny import random_sae

D, S, K = 16, 48, 5  # d_model, d_sae (= 3 × d_model), k


@pytest.fixture(scope="module")
def w() -> dict[str, torch.Tensor]:
    """Reference weights in the canonical orientation; some thresholds are negative."""
    g = torch.Generator().manual_seed(7)
    return {"W_enc": torch.randn(D, S, generator=g) * 0.4,
            "b_enc": torch.randn(S, generator=g) * 0.2,
            "W_dec": torch.randn(S, D, generator=g),
            "b_dec": torch.randn(D, generator=g) * 0.3,
            "threshold": torch.rand(S, generator=g) - 0.5}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3)) * 2  # (B, T, D)


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.detach().float(), b.float(), rtol=1e-5, atol=1e-5)


# -- SAELens -----------------------------------------------------------------------------------
def saelens_cfg_v6(arch: str, **extra) -> dict:
    """cfg.json as SAELens >= 6 writes it (model and hook under metadata)."""
    return {"d_in": D, "d_sae": S, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", **extra,
            "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post",
                         "hook_head_index": None, "model_class_name": "HookedTransformer",
                         "prepend_bos": True, "context_size": 1024,
                         "dataset_path": "monology/pile-uncopyrighted",
                         "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1"},
            "architecture": arch}


def saelens_cfg_v4(activation_fn: str, **extra) -> dict:
    """cfg.json as SAELens 3-5 wrote it (everything top-level)."""
    return {"architecture": "standard", "d_in": D, "d_sae": S, "activation_fn_str": activation_fn,
            "activation_fn_kwargs": {"k": K} if activation_fn == "topk" else {},
            "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
            "context_size": 128, "model_name": "gpt2-small",
            "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8, "hook_head_index": None,
            "prepend_bos": True, "dataset_path": "Skylion007/openwebtext",
            "dataset_trust_remote_code": True, "normalize_activations": "none",
            "dtype": "torch.float32", "device": "cpu", "sae_lens_training_version": "4.1.0",
            "neuronpedia_id": "gpt2-small/8-res-jb", "model_from_pretrained_kwargs": {},
            "seqpos_slice": [None], **extra}


def write_saelens(folder, w, cfg, names=("W_enc", "b_enc", "W_dec", "b_dec"), **more):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({**{n: w[n].contiguous() for n in names}, **more},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_saelens_v6_jumprelu(tmp_path, w, x):
    cfg = saelens_cfg_v6("jumprelu")
    cfg["apply_b_dec_to_input"] = False
    folder = write_saelens(tmp_path / "sl", w, cfg, ("W_enc", "b_enc", "W_dec", "b_dec",
                                                     "threshold"))
    assert detect_format(folder) == "saelens"
    sae = load_sae(folder)
    pre = x @ w["W_enc"] + w["b_enc"]
    f = torch.relu(pre) * (pre > w["threshold"])  # SAELens JumpReLU: relu, then the mask
    assert (w["threshold"] < 0).any() and (pre[(pre < 0) & (pre > w["threshold"])]).numel()
    assert_close(sae.encode(x), f)
    assert_close(sae.decode(f), f @ w["W_dec"] + w["b_dec"])
    i = sae.info
    assert (i.source_format, i.layer, i.hook, i.model) == ("saelens", 12, "resid_post",
                                                           "gemma-2-2b")
    assert i.source_path.endswith("sae_weights.safetensors") and not i.subtract_b_dec
    assert sae.mean_activation is None


def test_saelens_pre_v6_topk_with_resid_pre_hook(tmp_path, w, x):
    sae = load_sae(write_saelens(tmp_path / "sl", w, saelens_cfg_v4("topk")))
    assert_close(sae.encode(x), topk_relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], K))
    # blocks.8.hook_resid_pre is the output of decoder layer 7
    assert (sae.info.activation, sae.info.k, sae.info.layer, sae.info.hook) == (
        "topk", K, 7, "resid_post")
    assert sae.info.model == "gpt2-small"
    assert sae.info.extra["source_hook"] == "blocks.8.hook_resid_pre"


def test_saelens_topk_rescaled_by_decoder_norm_is_folded(tmp_path, w, x):
    cfg = saelens_cfg_v6("topk", k=K, rescale_acts_by_decoder_norm=True)
    sae = load_sae(write_saelens(tmp_path / "sl", w, cfg))
    n = w["W_dec"].norm(dim=1)
    f = topk_relu(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * n, K)
    assert_close(sae.encode(x), f)
    assert_close(sae(x), f @ (w["W_dec"] / n[:, None]) + w["b_dec"])


def test_saelens_finetuning_scaling_factor_is_folded(tmp_path, w, x):
    scale = torch.linspace(0.5, 2.0, S)
    cfg = saelens_cfg_v4("relu", finetuning_scaling_factor=True)
    sae = load_sae(write_saelens(tmp_path / "sl", w, cfg, scaling_factor=scale))
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert_close(sae.encode(x), f)
    assert_close(sae(x), (f * scale) @ w["W_dec"] + w["b_dec"])


def test_saelens_unsupported_settings_fail_clearly(tmp_path, w):
    gated = write_saelens(tmp_path / "gated", w, saelens_cfg_v6("gated"))
    with pytest.raises(LatentAuditError, match=r"cfg\.json.*architecture 'gated'"):
        load_sae(gated)
    cfg = saelens_cfg_v6("jumprelu", normalize_activations="expected_average_only_in")
    scaled = write_saelens(tmp_path / "scaled", w, cfg, ("W_enc", "b_enc", "W_dec", "b_dec",
                                                         "threshold"))
    with pytest.raises(LatentAuditError, match="normalize_activations.*fold"):
        load_sae(scaled)


# -- sparsify ----------------------------------------------------------------------------------
def write_sparsify(folder, w, **cfg):
    """A hookpoint folder as sparsify's SparseCoder.save_to_disk writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
               "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(
        {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True,
         "num_latents": 0, "k": K, "multi_topk": False, "skip_connection": False,
         "transcode": False, **cfg, "d_in": D}))
    return folder


def sparsify_reference(w, x):
    """sparsify: relu(linear(x - b_dec)), keep the top k, decode the kept rows of W_dec."""
    pre = torch.relu(F.linear(x - w["b_dec"], w["W_enc"].T, w["b_enc"]))
    vals, idx = pre.topk(K, dim=-1)
    recon = (vals.unsqueeze(-1) * w["W_dec"][idx]).sum(-2) + w["b_dec"]
    return torch.zeros_like(pre).scatter(-1, idx, vals), recon


def test_sparsify_folder(tmp_path, w, x):
    folder = write_sparsify(tmp_path / "layers.3", w)  # d_sae from expansion_factor 3
    assert detect_format(folder) == "sparsify"
    sae = load_sae(folder)
    f, recon = sparsify_reference(w, x)
    assert_close(sae.encode(x), f)
    assert_close(sae(x), recon)
    assert (sae.d_sae, sae.info.k, sae.info.layer, sae.info.hook) == (S, K, 3, "resid_post")


def test_sparsify_checkpoint_folder_with_one_folder_per_hookpoint(tmp_path, w):
    other = {**w, "b_dec": w["b_dec"] + 1.0}
    ckpt = tmp_path / "ckpt"
    write_sparsify(ckpt / "layers.1", other, num_latents=S)
    write_sparsify(ckpt / "layers.3", w)
    sae = load_sae(ckpt, hookpoint="layers.3")
    assert sae.info.layer == 3 and torch.equal(sae.b_dec.detach(), w["b_dec"])
    sae = load_sae(ckpt, layer=1)
    assert sae.info.layer == 1 and torch.equal(sae.b_dec.detach(), other["b_dec"])
    with pytest.raises(LatentAuditError, match=r"layers\.1, layers\.3.*--hookpoint"):
        load_sae(ckpt)
    with pytest.raises(LatentAuditError, match=r"no hookpoint folder 'layers\.9'.*layers\.1"):
        load_sae(ckpt, hookpoint="layers.9")
    with pytest.raises(LatentAuditError, match="none is for layer 5"):
        load_sae(ckpt, layer=5)
    single = tmp_path / "single"
    write_sparsify(single / "layers.2", w)
    assert load_sae(single).info.layer == 2


# -- Gemma Scope -------------------------------------------------------------------------------
def gemma_reference(w, x):
    pre = x @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction
    return (pre > w["threshold"]) * torch.relu(pre)


def test_gemma_scope_npz(tmp_path, w, x):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_5" / "width_16k" / "average_l0_10"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{n: t.numpy() for n, t in w.items()})
    for path in (folder, folder / "params.npz"):
        sae = load_sae(path)
        assert_close(sae.encode(x), gemma_reference(w, x))
        assert_close(sae.decode(gemma_reference(w, x)),
                     gemma_reference(w, x) @ w["W_dec"] + w["b_dec"])
        assert (sae.info.source_format, sae.info.layer, sae.info.model, sae.info.hook) == (
            "gemma_scope", 5, "google/gemma-2-2b", "resid_post")
        assert not sae.info.subtract_b_dec


def test_gemma_scope_safetensors_with_lowercase_names(tmp_path, w, x):
    file = tmp_path / "params.safetensors"
    save_file({"w_enc": w["W_enc"], "w_dec": w["W_dec"], "b_enc": w["b_enc"],
               "b_dec": w["b_dec"], "threshold": w["threshold"]}, str(file))
    assert detect_format(file) == "gemma_scope"
    assert_close(load_sae(file).encode(x), gemma_reference(w, x))


# -- OpenAI sparse_autoencoder -----------------------------------------------------------------
def openai_state_dict(w, activation="ReLU", tied=False):
    """What openai/sparse_autoencoder's Autoencoder.state_dict() returns."""
    sd = OrderedDict(pre_bias=w["b_dec"], latent_bias=w["b_enc"])
    sd["encoder.weight"] = w["W_enc"].T.contiguous()  # nn.Linear(n_inputs, n_latents)
    if tied:
        sd["decoder.linear.weight"] = sd["encoder.weight"]
    else:
        sd["decoder.weight"] = w["W_dec"].T.contiguous()  # nn.Linear(n_latents, n_inputs)
    sd["stats_last_nonzero"] = torch.zeros(S, dtype=torch.long)
    sd["latents_activation_frequency"] = torch.ones(S)
    sd["latents_mean_square"] = torch.zeros(S)
    sd["activation"] = activation
    sd["activation_state_dict"] = ({"k": K, "postact_fn": "ReLU"} if activation == "TopK"
                                   else OrderedDict())
    return sd


def test_openai_relu(tmp_path, w, x):
    file = tmp_path / "ae.pt"
    torch.save(openai_state_dict(w), file)
    assert detect_format(file) == "openai"
    sae = load_sae(file)
    latents = torch.relu(F.linear(x - w["b_dec"], w["W_enc"].T, w["b_enc"]))
    assert_close(sae.encode(x), latents)
    assert_close(sae(x), F.linear(latents, w["W_dec"].T) + w["b_dec"])
    assert sae.info.input_norm == "none"


def test_openai_tied_decoder(tmp_path, w, x):
    tied_w = {**w, "W_dec": w["W_enc"].T}
    torch.save(openai_state_dict(tied_w, tied=True), tmp_path / "ae.pt")
    sae = load_sae(tmp_path)  # the folder's only .pt file
    assert torch.equal(sae.W_dec.detach(), w["W_enc"].T)


def test_openai_topk_is_layer_normalised(tmp_path, w):
    torch.save(openai_state_dict(w, "TopK"), tmp_path / "ae.pt")
    sae = load_sae(tmp_path / "ae.pt")
    assert (sae.info.activation, sae.info.k, sae.info.input_norm) == ("topk", K, "layer_norm")


def test_openai_topk_layer_norm_matches_the_library(tmp_path, w, x):
    torch.save(openai_state_dict(w, "TopK"), tmp_path / "ae.pt")
    sae = load_sae(tmp_path / "ae.pt")
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (std + 1e-5)  # the library's LN
    latents = topk_relu(F.linear(xn - w["b_dec"], w["W_enc"].T, w["b_enc"]), K)
    assert_close(sae.encode(x), latents)
    assert_close(sae(x), (F.linear(latents, w["W_dec"].T) + w["b_dec"]) * std + mu)


# -- latentaudit's own format ------------------------------------------------------------------
@pytest.mark.parametrize("activation,k", [("relu", None), ("jumprelu", None), ("topk", 4)])
def test_latentaudit_round_trip(tmp_path, x, activation, k):
    sae = random_sae(D, S, seed=2, activation=activation, k=k, layer=1)
    sae.info.model, sae.info.extra["dataset"] = "tiny-llama", "wikitext"
    sae.save(tmp_path / "own")
    assert detect_format(tmp_path / "own") == "latentaudit"
    back = load_sae(tmp_path / "own")
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back.mean_activation is not None
    assert (back.info.activation, back.info.k, back.info.layer, back.info.model) == (
        activation, k, 1, "tiny-llama")
    assert back.info.extra == {"dataset": "wikitext"}
    assert_close(back.encode(x), sae.encode(x))


def test_latentaudit_fp16_save_and_dtype_override(tmp_path):
    sae = random_sae(D, S, seed=4, activation="jumprelu")
    sae.save(tmp_path / "half", dtype=torch.float16)
    back = load_sae(tmp_path / "half")
    assert back.W_enc.dtype == torch.float16 and back.mean_activation.dtype == torch.float16
    assert torch.equal(back.W_dec.detach(), sae.W_dec.detach().half())
    assert torch.equal(back.threshold, sae.threshold.half())
    assert load_sae(tmp_path / "half", dtype="fp32").W_enc.dtype == torch.float32


def test_layer_argument_fills_in_or_contradicts(tmp_path, w):
    torch.save(openai_state_dict(w), tmp_path / "ae.pt")
    assert load_sae(tmp_path / "ae.pt", layer=6).info.layer == 6
    random_sae(D, S, layer=1).save(tmp_path / "own")
    with pytest.raises(ShapeMismatchError, match="layer 1 but layer 4"):
        load_sae(tmp_path / "own", layer=4)


def test_check_fits_names_both_numbers():
    sae = random_sae(D, S, layer=2)
    with pytest.raises(ShapeMismatchError, match=f"d_model={D}.*d_model=64"):
        sae.check_fits(64, model_name="llama")
    with pytest.raises(ShapeMismatchError, match="layer 2 but layer 5"):
        sae.check_fits(D, layer=5)
    sae.check_fits(D, layer=2)


# -- broken files ------------------------------------------------------------------------------
@pytest.fixture
def saelens_dir(tmp_path, w):
    return write_saelens(tmp_path / "sl", w, saelens_cfg_v4("relu"))


def test_truncated_safetensors(saelens_dir):
    file = saelens_dir / "sae_weights.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(LatentAuditError, match=r"sae_weights\.safetensors is not a readable"):
        load_sae(saelens_dir)


def test_bad_json(saelens_dir):
    (saelens_dir / "cfg.json").write_text('{"d_in": 16,\n "d_sae": }')
    with pytest.raises(LatentAuditError, match=r"cfg\.json: invalid JSON at line 2"):
        load_sae(saelens_dir)
    (saelens_dir / "cfg.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(LatentAuditError, match=r"cfg\.json is not UTF-8"):
        load_sae(saelens_dir)


def test_missing_tensor(saelens_dir, w):
    save_file({n: w[n] for n in ("W_enc", "W_dec", "b_dec")},
              str(saelens_dir / "sae_weights.safetensors"))
    with pytest.raises(LatentAuditError, match=r"sae_weights\.safetensors has no tensor 'b_enc'"):
        load_sae(saelens_dir)


def test_wrong_shape_and_config_mismatch(saelens_dir, w):
    save_file({**{n: w[n] for n in ("W_enc", "b_enc", "b_dec")}, "W_dec": w["W_enc"].clone()},
              str(saelens_dir / "sae_weights.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"safetensors: tensor 'W_dec' has shape "
                       rf"\[{D}, {S}\], expected \[{S}, {D}\] from cfg\.json"):
        load_sae(saelens_dir)
    cfg = json.loads((saelens_dir / "cfg.json").read_text())
    (saelens_dir / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 2 * S}))
    with pytest.raises(ShapeMismatchError, match=rf"'W_enc'.*expected \[{D}, {2 * S}\].*d_sae"):
        load_sae(saelens_dir)


def test_non_finite_weights(saelens_dir, w):
    bad = w["W_dec"].clone()
    bad[3, 4] = float("nan")
    save_file({**{n: w[n] for n in ("W_enc", "b_enc", "b_dec")}, "W_dec": bad},
              str(saelens_dir / "sae_weights.safetensors"))
    with pytest.raises(LatentAuditError, match=r"safetensors: tensor 'W_dec' contains NaN"):
        load_sae(saelens_dir)


def test_truncated_npz_and_pickled_pt(tmp_path, w):
    np.savez(tmp_path / "params.npz", **{n: t.numpy() for n, t in w.items()})
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(LatentAuditError, match=r"params\.npz is not a readable"):
        load_sae(tmp_path / "params.npz")
    torch.save({"encoder": torch.nn.Linear(2, 3)}, tmp_path / "module.pt")
    with pytest.raises(LatentAuditError, match=r"module\.pt holds Python objects.*state_dict"):
        load_sae(tmp_path / "module.pt")


def test_unknown_folder_lists_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LatentAuditError) as err:
        load_sae(tmp_path)
    for expected in ("latentaudit", "saelens", "sae_weights.safetensors", "sparsify",
                     "gemma_scope", "params.npz", "openai", ".pt"):
        assert expected in str(err.value)
    with pytest.raises(LatentAuditError, match="does not exist"):
        load_sae(tmp_path / "missing")


def test_mean_activation_promised_but_missing(tmp_path):
    sae = random_sae(D, S, mean=False)
    sae.save(tmp_path / "own")
    cfg = json.loads((tmp_path / "own" / "cfg.json").read_text())
    (tmp_path / "own" / "cfg.json").write_text(json.dumps({**cfg, "has_mean_activation": True}))
    with pytest.raises(LatentAuditError, match="no tensor 'mean_activation'"):
        load_sae(tmp_path / "own")


# -- the command line --------------------------------------------------------------------------
def test_cli_info(tmp_path, w, capsys):
    folder = write_saelens(tmp_path / "sl", w, saelens_cfg_v4("topk"))
    assert main(["sae", "info", str(folder)]) == 0
    rows = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    shown = {key: value.strip() for key, value in rows.items()}
    assert shown["path"] == str(folder / "sae_weights.safetensors")
    assert {k: shown[k] for k in ("format", "d_model", "d_sae", "activation", "k", "layer",
                                  "model", "mean_activation")} == {
        "format": "saelens", "d_model": str(D), "d_sae": str(S), "activation": "topk",
        "k": str(K), "layer": "7", "model": "gpt2-small", "mean_activation": "no"}
    assert main(["sae", "info", "--json", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["k"] == K


def test_cli_convert(tmp_path, w, x, capsys):
    folder = write_sparsify(tmp_path / "ckpt" / "layers.3", w)
    out = tmp_path / "converted"
    argv = ["sae", "convert", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "fp16"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    sae = load_sae(out)
    assert (sae.info.source_format, sae.info.layer, sae.info.k) == ("latentaudit", 3, K)
    assert sae.W_enc.dtype == torch.float16
    assert sae.info.extra["converted_from"].startswith("sparsify:")
    torch.testing.assert_close(sae.W_enc.float(), w["W_enc"], atol=2e-3, rtol=1e-3)
    assert main(["sae", "convert", str(folder), "--out", str(folder)]) == 2
    assert "--out" in capsys.readouterr().err
