"""Choose the latents of an attribution run to explain (the run is read by
:class:`latentaudit.runfolder.RunFolder`). Every problem names the file and the field, before
any model loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from latentaudit.errors import LatentAuditError
from latentaudit.options import OptionError
from latentaudit.runfolder import RANKING, RunFolder


def read_run(path: str | os.PathLike) -> RunFolder:
    """Read and check a run folder (see :class:`latentaudit.runfolder.RunFolder`)."""
    return RunFolder.open(path, "--from")


def parse_latents(text: str, flag: str = "--latents") -> list[int]:
    """``"12,87"`` -> [12, 87], with an error that names ``flag``."""
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise LatentAuditError(f"{flag} {text!r}: give latent ids separated by commas, e.g. "
                               f"{flag} 12,87.") from None
    if not ids:
        raise LatentAuditError(f"{flag} is empty: give latent ids, e.g. {flag} 12,87.")
    return ids


def choose_latents(run: RunFolder, top_k: int, latents: Sequence[int] | None = None,
                   layer: int | None = None, field: str = "latents") -> dict[int, list[int]]:
    """{layer: latent ids}: the given ones (at ``layer``, needed when the run has several), else
    the top ``top_k`` of each layer's ranking; an error names option ``field`` (the given ids)
    or ``layer`` (an :class:`~latentaudit.options.OptionError`)."""
    if layer is not None and layer not in run.layers:
        raise OptionError("layer", f"{{}} {layer} is not a layer of the run {run.path} (layers: "
                                   f"{', '.join(map(str, run.layers))}).")
    if latents is None:
        chosen = {L: [r["latent"] for r in run.ranked(L)][:top_k]
                  for L in run.layers if layer in (None, L)}
        if not any(chosen.values()):
            raise LatentAuditError(f"{run.path / RANKING} holds no latents to explain.")
        return chosen
    if layer is None:
        if len(run.layers) > 1:
            layers = ", ".join(map(str, run.layers))
            raise OptionError(field, f"the run {run.path} has layers {layers}: pass {{layer}} "
                                     "with {}.")
        layer = run.layers[0]
    d_sae = run.d_sae(layer)
    bad = [i for i in latents if not 0 <= i < d_sae]
    if bad:
        raise OptionError(field, f"{{}} {', '.join(map(str, bad))}: out of range, the SAE of "
                                 f"layer {layer} has latents 0..{d_sae - 1}.")
    return {layer: list(dict.fromkeys(latents))}
