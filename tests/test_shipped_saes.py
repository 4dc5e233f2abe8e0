"""The SAEs shipped in the package: loadable, evaluated on held-out and outside text, and
documented with the numbers they record."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from latentaudit.models.embedded import EMBEDDED
from latentaudit.saes import load_sae
from latentaudit.saes.shipped import SHIPPED_DIR, shipped_models, shipped_names

README = Path(__file__).parents[1] / "README.md"


def test_every_embedded_default_has_a_shipped_sae():
    assert shipped_models() == sorted(EMBEDDED)


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_sae_loads_with_its_card_and_evaluation(name):
    folder = SHIPPED_DIR / name
    sae = load_sae(folder)
    assert (folder / "CARD.md").is_file()
    assert sae.W_dec.dtype == torch.float16  # the package budget
    assert sae.info.model in EMBEDDED and sae.info.layer is not None
    assert sae.mean_activation is not None and sae.info.activation == "topk"
    norms = sae.W_dec.float().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=2e-3, rtol=0)
    cfg = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    results = cfg["evaluation"]["results"]
    assert set(results) == {"held-out", "outside"}
    assert results["held-out"]["tokens"] >= 100_000 and results["outside"]["tokens"] >= 30_000
    assert all("sae evaluate" in r["command"] for r in results.values())
    card = (folder / "CARD.md").read_text(encoding="utf-8")
    for text in ("held-out", "outside"):
        assert f"{results[text]['fvu']:.3f}" in card, text


def _readme_rows() -> dict[str, list[str]]:
    """The README's shipped-SAE table: {SAE name: its cells}."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| SAE (`--sae`)"):].split("\n\n", 1)[0].splitlines()[2:]
    rows = {}
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[re.sub(r"[`*]|\s*\(.*\)", "", cells[0])] = cells
    return rows


def test_readme_table_shows_the_recorded_numbers():
    rows = _readme_rows()
    assert set(rows) == set(shipped_names())
    for name, cells in rows.items():
        cfg = json.loads((SHIPPED_DIR / name / "cfg.json").read_text(encoding="utf-8"))
        held, outside = (cfg["evaluation"]["results"][t] for t in ("held-out", "outside"))
        train = cfg["training"]
        want = [f"{held['fvu']:.3f}", f"{outside['fvu']:.3f}", f"{held['dead_fraction']:.1%}",
                f"{train['dead_fraction_train']:.1%}",
                f"{train['metrics']['ce_increase_pct']:.1f}%"]
        assert cells[4:] == want, name
        assert cells[3] == f"{cfg['d_sae']}, {cfg['k']}"
