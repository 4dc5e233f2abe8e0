"""The model-diffing baseline (Wang et al. 2025): latents whose activation differs most between
the model under study and a base model (e.g. before and after a fine-tune), on the same text.

1. Text: every completion of the attribution run's dataset (prompt + completion tokens).
2. For each model, the SAE's mean activation over the completion tokens at its hook point.
3. Δ_model = mean_main − mean_base per latent; its top-K is one more selection method.
   Stored in ``steer/model_diff.safetensors`` (with the base model and dataset hash), so a
   rerun does not recompute it.
"""

from __future__ import annotations

import json

import torch
from jaxtyping import Float
from torch import Tensor

from latentaudit._io import save_safetensors
from latentaudit._progress import progress
from latentaudit.data.tokens import left_pad, length_batches
from latentaudit.errors import LatentAuditError
from latentaudit.models.forward import pad_id
from latentaudit.models.hooks import run_until


@torch.no_grad()
def mean_completion_activation(loaded, sae, layer: int, seqs: list[tuple[list[int], list[int]]],
                               batch_size: int) -> Float[Tensor, " d_sae"]:
    """Mean SAE activation over the completion tokens of ``seqs`` (prompt ids, completion ids),
    read at the SAE's hook point of ``layer``."""
    pad = pad_id(loaded.tokenizer)
    total, count = torch.zeros(sae.d_sae, dtype=torch.float64), 0
    with progress(total=len(seqs), desc=f"activations ({loaded.name})", unit="completion") as bar:
        for idx in length_batches([len(p) + len(q) for p, q in seqs], batch_size):
            part = [seqs[i] for i in idx]
            batch = left_pad([p + q for p, q in part], pad)
            dev = loaded.device
            h = run_until(loaded.model, [layer], input_ids=batch.input_ids.to(dev),
                          attention_mask=batch.attention_mask.to(dev),
                          position_ids=batch.position_ids.to(dev),
                          point=sae.read_point)[layer]  # (B, T, D)
            T = h.shape[1]
            mask = torch.zeros(len(part), T, dtype=torch.bool)
            for b, (_, q) in enumerate(part):
                mask[b, T - len(q):] = True  # left padding: the completion ends the row
            f = sae.encode(h.float().to(sae.W_dec.device)[mask.to(h.device)])  # (N, d_sae)
            total += f.double().sum(0).cpu()
            count += int(mask.sum())
            bar.update(len(part))
    return (total / max(count, 1)).float()


def model_diff(plan, loaded, sae, *, device: str = "auto",
               dtype: str = "float32") -> Float[Tensor, " d_sae"]:
    """Δ_model per latent (cached in the sweep's work folder)."""
    from safetensors.torch import load_file

    from latentaudit.attribution.plan import encode_completions
    from latentaudit.data.behaviour import dataset_hash, load_behaviour
    from latentaudit.models.load import load_model

    if plan.dataset is None:
        raise LatentAuditError("--methods model-diff reads the run's dataset: pass --from RUN_DIR.")
    data = plan.dataset
    key = json.dumps({"base_model": plan.base_model, "model": plan.model,
                      "dataset_sha256": dataset_hash(data), "layer": plan.layer,
                      "sae": plan.sae_path})
    path = plan.work / "model_diff.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(path)["model_diff"]
    completions = load_behaviour(data)
    base = load_model(plan.base_model, device=device, dtype=dtype)
    sae.check_fits(base.d_model, plan.layer, base.name)
    means = []
    for m in (loaded, base):
        seqs = encode_completions(m.tokenizer, completions, None)
        means.append(mean_completion_activation(m, sae, plan.layer, seqs, plan.cfg.forward_batch))
    diff = means[0] - means[1]
    save_safetensors(path, {"model_diff": diff, "mean_main": means[0], "mean_base": means[1]},
                     metadata={"key": key, "schema_version": "1"})
    return diff
