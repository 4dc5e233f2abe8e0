"""Transcoders (read the MLP's input, write its output), from hand-built SAELens and sparsify
folders: the config decides both points, the encoder reads the MLP input (checked against a raw
hook on the MLP module), attribution uses the decoder on the output side (mlp_out), and the
kinds latentaudit does not read are one clear error each."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.data.behaviour import make_pairs
from latentaudit.errors import LatentAuditError
from latentaudit.models.hooks import layer_list
from latentaudit.saes import load_sae
from test_attribute import make_data
from test_hook_points import ids_of, model_of, reference_delta

D, S = 32, 12


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, S, generator=g) * 0.3, "b_enc": torch.randn(S, generator=g),
            "W_dec": torch.randn(S, D, generator=g), "b_dec": torch.randn(D, generator=g)}


def saelens_transcoder(folder, w, **cfg):
    """A folder as SAELens saves a Transcoder: cfg.json + sae_weights.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "transcoder", "d_in": D, "d_sae": S, "d_out": D,
        "activation_fn": "relu", "apply_b_dec_to_input": True, "dtype": "float32",
        "metadata": {"hook_name": "blocks.1.ln2.hook_normalized",
                     "hook_name_out": "blocks.1.hook_mlp_out", "model_name": "tiny"}, **cfg}))
    return folder


def sparsify_transcoder(root, w, name="layers.1.mlp", **cfg):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
               "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "num_latents": S, "k": 3, "transcode": True,
        "skip_connection": False, "d_in": D, **cfg}))
    return folder


def test_a_saelens_transcoder_reads_the_mlp_input_and_writes_its_output(tmp_path):
    w = weights()
    sae = load_sae(saelens_transcoder(tmp_path / "tc", w))
    assert (sae.info.layer, sae.info.hook, sae.read_point) == (1, "mlp_out", "mlp_in")
    assert not sae.info.subtract_b_dec and sae.info.extra["transcoder"]
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    # SAELens' Transcoder.encode: no b_dec on the input side
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ w["W_enc"] + w["b_enc"]))
    torch.testing.assert_close(sae(x), sae.encode(x) @ w["W_dec"] + w["b_dec"])
    other = load_sae(saelens_transcoder(tmp_path / "tc2", w, metadata={
        "hook_name": "blocks.1.hook_mlp_in", "hook_name_out": "blocks.1.hook_mlp_out"}))
    assert other.read_point == "mlp_in"
    resaved = load_sae(sae.save(tmp_path / "native"))  # the native format keeps both points
    assert (resaved.info.hook, resaved.read_point) == ("mlp_out", "mlp_in")


def test_a_sparsify_transcoder_reads_the_mlp_input(tmp_path):
    w = weights(2)
    sparsify_transcoder(tmp_path, w)
    sae = load_sae(tmp_path, hookpoint="layers.1.mlp")
    assert (sae.info.layer, sae.info.hook, sae.read_point) == (1, "mlp_out", "mlp_in")
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    pre = torch.relu(x @ w["W_enc"] + w["b_enc"])  # transcode: no b_dec subtracted
    vals, idx = pre.topk(3, dim=-1)
    torch.testing.assert_close(sae.encode(x), torch.zeros_like(pre).scatter(-1, idx, vals))


@pytest.mark.parametrize(("make", "message"), [
    (lambda p, w: saelens_transcoder(p, w, architecture="skip_transcoder"),
     "skip_transcoder"),
    (lambda p, w: saelens_transcoder(p, w, d_out=D + 1), "field 'd_out' is 33"),
    (lambda p, w: saelens_transcoder(p, w, metadata={"hook_name": "blocks.1.hook_mlp_in"}),
     "needs 'hook_name_out'"),
    (lambda p, w: sparsify_transcoder(p, w, "layers.1"), "read at an MLP"),
    (lambda p, w: sparsify_transcoder(p, w, skip_connection=True), "'skip_connection'"),
])
def test_transcoders_latentaudit_does_not_read_are_one_error(tmp_path, make, message):
    folder = make(tmp_path / "x", weights())
    with pytest.raises(LatentAuditError, match=message):
        load_sae(folder)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_transcoder_is_attributed_on_its_output_side(tmp_path, arch):
    """δ from the decoder rows at mlp_out (as an mlp_out SAE's would be); Δ-activation from
    the encoder on the MLP's input, captured here by a raw pre-hook on the MLP module."""
    lm = model_of(arch)
    w = {k: v.double() for k, v in weights(4).items()}
    sae = load_sae(saelens_transcoder(tmp_path / "tc", w), dtype="fp32").double()
    data = make_data()
    result = attribute(lm, sae, data, AttributionConfig(batch_size=3, abar="zero"))
    layer = result.layers[1]
    dirs = sae.decoder_directions(torch.float64)
    per = [reference_delta(lm, c, 1, "mlp_out", dirs, torch.zeros(D, dtype=torch.float64))
           for c in data]
    pairs = make_pairs(data).pairs
    expected = sum(per[p] - per[q] for p, q in pairs) / len(pairs)
    torch.testing.assert_close(layer.delta_attribution.double(), expected, rtol=1e-4, atol=1e-7)

    used = sorted({i for pair in pairs for i in pair})
    sums = {True: torch.zeros(S, dtype=torch.float64), False: torch.zeros(S, dtype=torch.float64)}
    counts = {True: 0, False: 0}
    seen = []
    handle = layer_list(lm.model)[1].mlp.register_forward_pre_hook(
        lambda m, args: seen.append(args[0]))
    try:
        for i in used:
            p, q, ids = ids_of(lm, data[i])
            seen.clear()
            with torch.no_grad():
                lm.model(input_ids=ids)
            f = sae.encode(seen[0][0, len(p):])  # (len(q), S)
            sums[data[i].positive] += f.sum(0)
            counts[data[i].positive] += len(q)
    finally:
        handle.remove()
    hand = sums[True] / counts[True] - sums[False] / counts[False]
    torch.testing.assert_close(layer.delta_activation.double(), hand, rtol=1e-4, atol=1e-6)
