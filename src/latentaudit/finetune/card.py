"""The card of a fine-tuned adapter: ``finetune.json`` (machine-readable), ``README.md`` and
``loss.png`` (the loss per step and its running mean)."""

from __future__ import annotations

import logging
from pathlib import Path

from latentaudit._io import atomic_open, write_json

log = logging.getLogger(__name__)

CARD = "finetune.json"
SCHEMA_VERSION = 1


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_card(out: Path, record: dict) -> None:
    """Write the three files of the card into the adapter folder ``out``."""
    if _plot(out / "loss.png", record["losses"], record.get("name", out.name)):
        record = {**record, "figure": "loss.png"}
    write_json(out / CARD, {"schema_version": SCHEMA_VERSION, **record})
    with atomic_open(out / "README.md") as f:
        f.write(card_markdown(record))


def card_markdown(r: dict) -> str:
    losses = r["losses"]
    tail = running_mean(losses, 20)
    opts = "\n".join(f"| `{k}` | {v} |" for k, v in r["config"].items())
    lines = [
        f"# {r.get('name', 'adapter')}",
        "",
        f"A LoRA adapter of `{r['base_model']}`, made by `latentaudit finetune`.",
        "",
        f"- Data: `{r['data']}` (sha256 `{r['data_sha256'][:16]}…`), {r['rows']} conversations"
        f" ({r['dropped']} dropped: no assistant token within max_length), "
        f"{r['target_tokens']:,} assistant tokens of {r['tokens']:,} per epoch.",
        f"- Steps: {r['steps']} ({r['config']['epochs']} epoch(s) of batch "
        f"{r['config']['batch_size']}); wall time {r['seconds'] / 60:.1f} min on {r['device']}.",
        f"- Loss (mean cross-entropy on assistant tokens): first step {losses[0]:.3f}, "
        f"mean of the last 20 steps {tail[-1]:.3f}.",
        f"- Trainable parameters: {r['trainable_params']:,}.",
        "",
        "| option | value |",
        "|---|---|",
        opts,
        "",
    ]
    if r.get("figure"):
        lines += ["![loss per step](loss.png)", ""]
    if r.get("notes"):
        lines += [*r["notes"], ""]
    return "\n".join(lines)


def _plot(path: Path, losses: list[float], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no loss figure")
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="0.7", lw=0.8, label="per step")
    ax.plot(steps, running_mean(losses, 20), color="C0", lw=1.5, label="mean of 20 steps")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True
