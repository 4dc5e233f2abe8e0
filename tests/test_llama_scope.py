"""The Llama Scope reader on hand-written folders in its layout (hyperparams.json +
checkpoints/final.safetensors): the converted SAE reproduces the format's own computation
(input and output norms, the threshold on p·‖decoder column‖, written out here from the format's
definition), with its layer and hook point; the settings it cannot fold are one clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from latentaudit.errors import LatentAuditError
from latentaudit.saes import load_sae
from latentaudit.saes.formats import detect_format

D, S = 16, 40
N_IN, N_OUT = 3.5, 7.0


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(D, S, generator=g) * torch.rand(S, generator=g)  # uneven column norms
    return {"encoder.weight": torch.randn(S, D, generator=g) * 0.3,
            "encoder.bias": torch.randn(S, generator=g) * 0.5,
            "decoder.weight": dec, "decoder.bias": torch.randn(D, generator=g)}


def write(folder, t, **cfg):
    """A folder as Llama Scope publishes one (e.g. Llama3_1-8B-Base-L2R-8x/)."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "checkpoints" / "final.safetensors"))
    hook = "blocks.2.hook_resid_post"
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": D, "d_sae": S, "expansion_factor": S / D, "hook_point_in": hook,
        "hook_point_out": hook, "act_fn": "jumprelu", "jump_relu_threshold": 0.4,
        "norm_activation": "dataset-wise", "sparsity_include_decoder_norm": True,
        "apply_decoder_bias_to_pre_encoder": False, "use_decoder_bias": True, "top_k": 5,
        "dataset_average_activation_norm": {"in": N_IN, "out": N_OUT},
        "model_name": "meta-llama/Llama-3.1-8B", **cfg}))
    return folder


def reference(t, x, act="jumprelu", theta=0.4, k=5):
    """The format's forward pass: normalise, encode, mask on p·‖column‖, decode, denormalise."""
    s_in, s_out = math.sqrt(D) / N_IN, math.sqrt(D) / N_OUT
    p = (s_in * x) @ t["encoder.weight"].T + t["encoder.bias"]  # (N, S)
    score = p * t["decoder.weight"].norm(dim=0)
    if act == "jumprelu":
        mask = score > theta
    elif act == "relu":
        mask = score > 0
    else:
        kth = score.clamp_min(0).topk(k, dim=-1).values[:, -1:]
        mask = (score >= kth) & (score > 0)
    f = p * mask
    return mask, (f @ t["decoder.weight"].T + t["decoder.bias"]) / s_out


@pytest.mark.parametrize("act", ["jumprelu", "relu", "topk"])
def test_the_converted_sae_computes_what_the_format_computes(tmp_path, act):
    t = tensors()
    folder = write(tmp_path / "Llama3_1-8B-Base-L2R-8x", t, act_fn=act)
    assert detect_format(folder) == "llama_scope"
    sae = load_sae(folder)
    assert (sae.info.layer, sae.info.hook, sae.info.model) == (2, "resid_post",
                                                                "meta-llama/Llama-3.1-8B")
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(1)) * N_IN / math.sqrt(D) * 4
    mask, recon = reference(t, x, act)
    assert 0 < mask.sum() < mask.numel()  # the test can fail
    assert torch.equal(sae.encode(x) != 0, mask)
    torch.testing.assert_close(sae(x), recon, rtol=1e-4, atol=1e-5)


def test_attention_mlp_and_transcoder_folders_keep_their_points(tmp_path):
    t = tensors(1)
    mlp = load_sae(write(tmp_path / "L5M", t, hook_point_in="blocks.5.hook_mlp_out",
                         hook_point_out="blocks.5.hook_mlp_out"))
    assert (mlp.info.layer, mlp.info.hook, mlp.read_point) == (5, "mlp_out", "mlp_out")
    attn = load_sae(write(tmp_path / "L5A", t, hook_point_in="blocks.5.hook_attn_out",
                          hook_point_out="blocks.5.hook_attn_out"))
    assert attn.info.hook == "attn_out"
    tc = load_sae(write(tmp_path / "L5TC", t, hook_point_in="blocks.5.ln2.hook_normalized",
                        hook_point_out="blocks.5.hook_mlp_out"))
    assert (tc.info.hook, tc.read_point) == ("mlp_out", "mlp_in")
    plain = load_sae(write(tmp_path / "inf", t, norm_activation="inference",
                           sparsity_include_decoder_norm=False, act_fn="relu"))
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(2))
    p = x @ t["encoder.weight"].T + t["encoder.bias"]
    torch.testing.assert_close(plain(x), torch.relu(p) @ t["decoder.weight"].T
                               + t["decoder.bias"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("cfg", "message"), [
    ({"norm_activation": "token-wise"}, "norm_activation 'token-wise' is not supported"),
    ({"dataset_average_activation_norm": {"in": 3.0}}, "needs a positive 'out' value"),
    ({"apply_decoder_bias_to_pre_encoder": True}, "'apply_decoder_bias_to_pre_encoder'"),
    ({"act_fn": "gelu"}, "act_fn 'gelu' is not supported"),
    ({"d_sae": S + 1}, r"'encoder.weight' has shape \[40, 16\], expected \[41, 16\]"),
])
def test_what_the_reader_cannot_fold_is_one_error(tmp_path, cfg, message):
    folder = write(tmp_path / "bad", tensors(), **cfg)
    with pytest.raises(LatentAuditError, match=message):
        load_sae(folder)
