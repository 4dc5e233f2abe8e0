"""openai/sparse_autoencoder (``Autoencoder.state_dict()``): a ``.pt`` file.

Tensors ``encoder.weight`` [n_latents, n_inputs], ``decoder.weight`` [n_inputs, n_latents] (or
``decoder.linear.weight`` when tied), ``pre_bias``, ``latent_bias``, ``activation`` ("ReLU" |
"TopK") and ``activation_state_dict`` (``k``, ``postact_fn``); the training statistics buffers
are ignored. As in that library, TopK autoencoders layer-normalise each input token
(``input_norm="layer_norm"``).
"""

from __future__ import annotations

from pathlib import Path

from latentaudit.errors import LatentAuditError
from latentaudit.saes.formats._read import cfg_int, read_tensors, take
from latentaudit.saes.sae import SAE, SAEInfo


def load(file: Path) -> SAE:
    """Read an openai/sparse_autoencoder state dict (see the module docstring)."""
    sd = read_tensors(file)
    name, act_state = sd.get("activation", "ReLU"), sd.get("activation_state_dict") or {}
    if name == "TopK" and act_state.get("postact_fn", "ReLU") == "ReLU":
        activation, k, norm = "topk", cfg_int(file, act_state, "k"), "layer_norm"
    elif name == "ReLU":
        activation, k, norm = "relu", None, "none"
    else:
        raise LatentAuditError(f"{file}: activation '{name}' ({act_state.get('postact_fn')}) "
                               "is not supported (ReLU and TopK with ReLU are).")
    enc = take(file, sd, {"encoder.weight": (None, None)})[0]
    s, d = enc.shape
    pre_bias, latent_bias = take(file, sd, {"pre_bias": (d,), "latent_bias": (s,)})
    if "decoder.weight" not in sd and "decoder.linear.weight" in sd:  # tied: W_dec is encoder's
        W_dec = take(file, sd, {"decoder.linear.weight": (s, d)})[0]
    else:
        W_dec = take(file, sd, {"decoder.weight": (d, s)})[0].T
    info = SAEInfo(activation=activation, k=k, subtract_b_dec=True, input_norm=norm,
                   source_format="openai", source_path=str(file))
    return SAE(enc.T, latent_bias, W_dec, pre_bias, info=info)
