"""LoRA supervised fine-tuning with exact resume.

Algorithm (:func:`finetune`):

1. Read and check the chat JSONL (:mod:`~latentaudit.finetune.chat`) and the options before the
   model loads; tokenize every conversation with its assistant mask.
2. Wrap the model in LoRA adapters (peft: ``W x + (alpha / r) B A x`` on the target modules,
   ``A`` random with the run's seed, ``B = 0``, so the first step starts from the base model).
3. Step s reads batch ``s mod S`` of epoch ``s div S`` (S steps an epoch); an epoch's order is a
   permutation seeded by (seed, epoch), so the data position is a function of s alone. The loss is
   the mean cross-entropy over the batch's assistant tokens (every other token is masked).
4. AdamW with a linear warm-up then a linear decay to 0 at the last step (a function of s alone),
   the gradient norm clipped.
5. Every ``checkpoint_every`` steps, the adapter weights, AdamW's state, the RNG state, s and the
   loss history are written to ``checkpoint/`` (a new folder renamed into place, so a kill
   leaves the previous one whole). A rerun with the same model, data and options resumes from it
   and ends with the weights of an uninterrupted run.
6. At the end the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) and
   its card (:mod:`~latentaudit.finetune.card`) are written and the checkpoint removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from latentaudit._io import save_safetensors, sha256_file, write_json
from latentaudit._progress import progress
from latentaudit.errors import LatentAuditError, require
from latentaudit.finetune.chat import Tokenized, tokenize_chat
from latentaudit.finetune.config import FinetuneConfig
from latentaudit.options import OptionError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE = "checkpoint.json"
SCHEMA_VERSION = 1


class Batch(NamedTuple):
    input_ids: Tensor  # (batch, pos)
    attention_mask: Tensor  # (batch, pos)
    labels: Tensor  # (batch, pos), -100 where no loss is taken


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The rows of step ``step``: a function of the step alone (step 3)."""
    per_epoch = steps_per_epoch(n, batch_size)
    epoch, b = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[b * batch_size:(b + 1) * batch_size].tolist()


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def collate(rows: list[Tokenized], pad_id: int) -> Batch:
    """Right-padded ids, the attention mask, and labels only on the assistant's tokens."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        mask[i, :n] = 1
        target = torch.tensor(r.target)
        labels[i, :n] = torch.where(target, ids[i, :n], -100)
    return Batch(ids, mask, labels)


def masked_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each labelled token given the tokens before it."""
    # logits (batch, pos, vocab); the token at t+1 is predicted at t
    pred = logits[:, :-1].float()
    gold = labels[:, 1:]
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), gold.reshape(-1),
                                             ignore_index=-100)


def target_loss(model, batch: Batch, device: torch.device) -> Tensor:
    """:func:`masked_loss` without the full-vocabulary logits: the decoder's last hidden state
    goes through the output layer only where a token is predicted (the assistant's tokens)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        out = model(input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device))
        return masked_loss(out.logits, batch.labels.to(device))
    body, head = base.get_decoder(), base.get_output_embeddings()
    hidden = body(input_ids=batch.input_ids.to(device),
                  attention_mask=batch.attention_mask.to(device)).last_hidden_state  # (B, T, D)
    gold = batch.labels[:, 1:].to(device)  # (B, T-1)
    keep = gold != -100
    logits = head(hidden[:, :-1][keep])  # (N, vocab)
    return torch.nn.functional.cross_entropy(logits.float(), gold[keep])


def prepare_data(tokenizer, convs: list[list[dict[str, str]]], path: str | Path,
                 max_length: int) -> tuple[list[Tokenized], int]:
    """Tokenized conversations (read from ``path``) and how many were dropped (no assistant
    token within ``max_length``)."""
    rows = [tokenize_chat(tokenizer, m, max_length) for m in convs]
    kept = [r for r in rows if r is not None]
    if not kept:
        raise OptionError("max_length", f"--data {path}: no conversation keeps an assistant "
                                        f"token within {{}} {max_length}.")
    return kept, len(rows) - len(kept)


def wrap_lora(model, config: FinetuneConfig):
    """The model with fresh LoRA adapters (seeded), only they trainable (step 2)."""
    peft = require("peft", "pip install 'latentaudit[finetune]'", "Fine-tuning with LoRA")
    torch.manual_seed(config.seed)
    lora = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           target_modules=config.modules(), bias="none", task_type="CAUSAL_LM")
    try:
        wrapped = peft.get_peft_model(model, lora)
    except ValueError as err:
        raise OptionError("target_modules", f"{{}} {config.target_modules}: {err}") from None
    return wrapped


def trainable(model) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class RunState(NamedTuple):
    step: int
    losses: list[float]
    seconds: float


def identity(model_name: str, data: str | Path, config: FinetuneConfig) -> dict:
    """What a checkpoint must match to be resumed."""
    return {"model": model_name, "data_sha256": sha256_file(data), "config": asdict(config)}


def mismatch(record: dict, ident: dict) -> str | None:
    """The first of model, data and options on which ``record`` differs from this run."""
    return next((k for k in ("model", "data_sha256", "config") if record.get(k) != ident[k]),
                None)


def save_checkpoint(out: Path, model, optimizer, state: RunState, ident: dict) -> None:
    """Write ``checkpoint/`` as a new folder renamed into place (step 5)."""
    tmp = out / f".{CHECKPOINT}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable(model).items()}
    tensors["__rng__"] = torch.get_rng_state()
    save_safetensors(tmp / "adapter.safetensors", tensors)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    write_json(tmp / STATE, {"schema_version": SCHEMA_VERSION, "step": state.step,
                             "losses": state.losses, "seconds": state.seconds, **ident})
    final, old = out / CHECKPOINT, out / f".{CHECKPOINT}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(out: Path, ident: dict) -> dict | None:
    """The checkpoint's record if there is one for this run (else None; another run's: error)."""
    path = out / CHECKPOINT / STATE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    key = mismatch(record, ident)
    if key:
        raise LatentAuditError(
            f"{path}: the checkpoint in --out was made with another {key} "
            f"({record.get(key)!r}); pass a new --out, or --restart to discard it.")
    return record


def load_checkpoint(out: Path, model, optimizer) -> None:
    from safetensors.torch import load_file

    tensors = load_file(out / CHECKPOINT / "adapter.safetensors")
    torch.set_rng_state(tensors.pop("__rng__"))
    params = trainable(model)
    if set(tensors) != set(params):
        raise LatentAuditError(f"{out / CHECKPOINT}: its adapter tensors do not match this "
                               "model's LoRA modules; pass --restart to discard it.")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(out / CHECKPOINT / "optimizer.pt", weights_only=True))


def make_optimizer(model, config: FinetuneConfig):
    return torch.optim.AdamW(list(trainable(model).values()), lr=config.lr,
                             weight_decay=config.weight_decay)


def train_step(model, batch: Batch, optimizer, lr: float, config: FinetuneConfig,
               device: torch.device) -> float:
    """One AdamW step at learning rate ``lr``; the batch's loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = target_loss(model, batch, device)
    loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(list(trainable(model).values()), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_loop(model, rows: list[Tokenized], pad_id: int, config: FinetuneConfig, out: Path,
             ident: dict, device: torch.device) -> RunState:
    """Steps from the last checkpoint (or 0) to the end, checkpointing as it goes."""
    total = steps_per_epoch(len(rows), config.batch_size) * config.epochs
    optimizer = make_optimizer(model, config)
    record = read_checkpoint(out, ident)
    state = RunState(0, [], 0.0)
    if record is not None:
        load_checkpoint(out, model, optimizer)
        state = RunState(record["step"], list(record["losses"]), record["seconds"])
        log.info("resuming at step %d of %d", state.step, total)
    model.train()
    bar = progress(total=total, initial=state.step, desc="finetune", unit="step")
    start = time.perf_counter() - state.seconds
    losses = state.losses
    for step in range(state.step, total):
        idx = batch_indices(step, len(rows), config.batch_size, config.seed)
        lr = config.lr * lr_factor(step, total, config.warmup_steps)
        losses.append(train_step(model, collate([rows[i] for i in idx], pad_id), optimizer, lr,
                                 config, device))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = RunState(step + 1, losses, time.perf_counter() - start)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
            save_checkpoint(out, model, optimizer, done, ident)
    bar.close()
    model.eval()
    return RunState(total, losses, time.perf_counter() - start)
