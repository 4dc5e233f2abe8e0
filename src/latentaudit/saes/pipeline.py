"""Train an SAE from text end to end (what ``latentaudit train-sae`` runs).

1. Check the configurations and the output folder, before any model loads.
2. Load the model; text -> packed token sequences of the train split (the user's files or the
   default training mix of the reference corpus).
3. Harvest layer L's activations into ``OUT/activations`` (resumable,
   :func:`~latentaudit.saes.harvest.harvest`).
4. Train a TopK SAE (:class:`~latentaudit.saes.train.Trainer`), checkpointing into
   ``OUT/checkpoint``; a stopped run continues from its last checkpoint with ``resume``.
5. Export it with ā (the harvest mean) and the training record, evaluate it on held-out text
   (:mod:`latentaudit.saes.evaluate`: the held-out split, or, for a small corpus without one,
   its first sequences, kept out of training) and save ``OUT/cfg.json`` + ``sae.safetensors``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from latentaudit.data.corpus import load_corpus
from latentaudit.errors import LatentAuditError
from latentaudit.models.forward import pad_id
from latentaudit.models.load import load_model, resolve_device
from latentaudit.saes.harvest import HarvestConfig, harvest, token_sequences
from latentaudit.saes.metrics import Evaluation, evaluate_sae
from latentaudit.saes.sae import SAE, SAEInfo
from latentaudit.saes.train import CHECKPOINT, TrainConfig, Trainer

STARTED = ("cfg.json", "activations/manifest.json", "checkpoint/checkpoint.json")
"""Files whose presence means OUT already holds a run."""


@dataclass(frozen=True)
class TrainSAEResult:
    """The trained SAE, its evaluation, and where it was saved."""

    sae: SAE
    evaluation: Evaluation
    eval_text: str
    dead_fraction_train: float
    out: Path


def check_output(out: Path, resume: bool) -> None:
    """Refuse to start over a run already in ``out`` unless resuming (step 1)."""
    started = [p for p in STARTED if (out / p).exists()]
    if started and not resume:
        raise LatentAuditError(
            f"--out {out} already holds a run ({started[0]}): pass --resume to continue it, "
            "or choose another --out.")


def describe_corpus(paths: Sequence[str | os.PathLike] | None) -> str:
    if not paths:
        return "reference corpus (latentaudit data fetch), train split"
    return "corpus " + ", ".join(str(Path(p).resolve()) for p in paths) + ", train split"


def _texts(paths: Sequence[str | os.PathLike] | None, split: str) -> Iterator[str]:
    return (doc.text for doc in load_corpus(list(paths) if paths else None, split=split))


def train_sae(model: str, out: str | os.PathLike, harvest_cfg: HarvestConfig,
              train_cfg: TrainConfig, *, corpus: Sequence[str | os.PathLike] | None = None,
              eval_sequences: int = 32, device: str = "auto", dtype: str = "auto",
              resume: bool = False, command: str = "") -> TrainSAEResult:
    """Harvest, train, evaluate and save an SAE into ``out`` (see the module docstring)."""
    out = Path(out)
    check_output(out, resume)
    if eval_sequences < 1:
        raise LatentAuditError("--eval-sequences must be at least 1.")
    dev = resolve_device(device)
    dtype = dtype if dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
    texts = {split: _texts(corpus, split) for split in ("train", "held_out")}  # checks the files
    loaded = load_model(model, device=str(dev), dtype=dtype)
    source = describe_corpus(corpus)
    ctx, layer = harvest_cfg.context_len, harvest_cfg.layer

    def sequences(split: str):
        return token_sequences(texts[split], loaded.tokenizer, ctx, harvest_cfg.packing)

    seqs = sequences("train")
    eval_seqs = list(itertools.islice(sequences("held_out"), eval_sequences))
    eval_text = "held-out split"
    if not eval_seqs:  # a small corpus may have no held-out document: hold out its start
        eval_seqs = list(itertools.islice(seqs, eval_sequences))
        eval_text = f"first {len(eval_seqs)} sequences of the train split, not trained on"
        source += f", minus its first {eval_sequences} sequences"
    if not eval_seqs:
        raise LatentAuditError(f"The {source} holds no text of at least two tokens.")
    store = harvest(loaded, seqs, out / "activations", harvest_cfg,
                                     source=source)
    ckpt = out / "checkpoint"
    if resume and (ckpt / CHECKPOINT).exists():
        trainer = Trainer.resume(ckpt, dev, train_cfg)
    else:
        trainer = Trainer.start(train_cfg, store, dev)
    trainer.fit(store, checkpoint_dir=ckpt)
    mean = store.mean()
    training = {"model": model, "layer": layer, "hook": "resid_post", "data": source,
                "harvest": {k: store.manifest[k] for k in (
                    "tokens", "context_len", "packing", "skip_first", "store_dtype")},
                "tokens": trainer.step * train_cfg.batch_size, "steps": trainer.step,
                "input_scale": trainer.scale, "dead_fraction_train": trainer.dead_fraction(),
                "config": json.loads(json.dumps(asdict(train_cfg))), "command": command}
    info = SAEInfo(activation="topk", k=train_cfg.k, subtract_b_dec=True, model=model,
                   layer=layer, hook="resid_post", extra={"training": training})
    sae = trainer.export(info, mean)
    pad = pad_id(loaded.tokenizer)
    ev = evaluate_sae(loaded.model, sae, eval_seqs, layer, mean,
                      skip_first=harvest_cfg.skip_first, pad_id=pad)
    training["metrics"] = {"eval_text": eval_text, "eval_tokens": ev.tokens, "fvu": ev.fvu,
                           "l0": ev.l0, "dead_fraction_eval": ev.dead_fraction,
                           "ce_clean": ev.ce.clean, "ce_spliced": ev.ce.spliced,
                           "ce_mean_ablated": ev.ce.ablated, "ce_increase": ev.ce.increase,
                           "ce_increase_pct": ev.ce.increase_pct}
    sae.save(out)
    return TrainSAEResult(sae, ev, eval_text, trainer.dead_fraction(), out)
