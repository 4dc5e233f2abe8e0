"""SAE training: harvesting, the TopK trainer, its metrics and the train-sae command.

Ground truths: a planted sparse dictionary the trainer must recover; activations equal to a full
forward's ``hidden_states[L + 1]``; a resumed harvest / training identical to an uninterrupted
one; hand-computed metric values; an exact SAE that must cost no cross-entropy.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from latentaudit.errors import LatentAuditError
from latentaudit.models.load import prepare
from latentaudit.saes import harvest as harvest_mod
from latentaudit.saes.harvest import (
    ActivationStore,
    HarvestConfig,
    TensorChunks,
    harvest,
    iter_batches,
    token_sequences,
)
from latentaudit.saes.metrics import (
    ce_loss_increase,
    dead_fraction,
    evaluate_sae,
    evaluate_saes,
    fvu,
    l0,
)
from latentaudit.saes.sae import SAE, SAEInfo
from latentaudit.saes.train import (
    TrainConfig,
    Trainer,
    geometric_median,
    lr_at,
    project_decoder_grad,
)
from tiny import tiny_model, tiny_tokenizer

WORDS = "the cat sat on a mat while dogs ran over green hills and wide rivers".split()


def documents(n: int = 60, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=g).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (m,), generator=g).tolist())
            for m in lengths]


def planted(n: int, d: int = 64, m: int = 512, k: int = 4, seed: int = 123):
    """Rows x = codes @ D + offset: k-sparse positive codes over m unit directions."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).topk(k, dim=1).indices  # (N, k)
    codes = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return codes @ D + 0.3, D


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matmuls run fastest (and steadiest on a busy machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded():
    return prepare(tiny_model(layers=3), tiny_tokenizer(), name="tiny")  # layer 1 is not last


def sequences(tokenizer, context_len=16, packing="pack"):
    return list(token_sequences(documents(), tokenizer, context_len, packing))


# -- token sequences ------------------------------------------------------------------------
def test_token_sequences_pack_and_truncate():
    tok = tiny_tokenizer()
    a, b = (tok(t, add_special_tokens=False)["input_ids"] for t in ("abc", "de"))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    packed = list(token_sequences(["abc", "de"], tok, 4, "pack"))
    assert packed == [[bos, *a], [bos, eos, *b]]  # the trailing [eos] is dropped
    truncated = list(token_sequences(["abc", "de"], tok, 3, "truncate"))
    assert truncated == [[bos, *a[:2]], [bos, *b]]


# -- harvesting -----------------------------------------------------------------------------
def full_forward_rows(loaded, seqs, layer, skip_first):
    ids = torch.tensor(seqs)
    hs = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    return hs[:, skip_first:].reshape(-1, hs.shape[-1])


def test_harvest_equals_hidden_states_and_mean(loaded, tmp_path):
    seqs = sequences(loaded.tokenizer)
    cfg = HarvestConfig(layer=0, tokens=10**6, context_len=16, batch_size=5, shard_tokens=64,
                        window_tokens=128, store_dtype="float32", shuffle=False)
    store = harvest(loaded, seqs, tmp_path, cfg)
    rows = torch.cat([store.load(i) for i in range(len(store.chunk_sizes))])
    want = full_forward_rows(loaded, seqs, 0, 1)
    assert store.complete and store.n_tokens == len(seqs) * 15
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(store.mean(), want.mean(0), rtol=1e-5, atol=1e-6)
    assert max(store.chunk_sizes) <= 64


def test_harvest_stops_at_tokens_and_truncate_mode(loaded, tmp_path):
    docs = documents()
    seqs = list(token_sequences(docs, loaded.tokenizer, 12, "truncate"))
    cfg = HarvestConfig(layer=1, tokens=100, context_len=12, packing="truncate", batch_size=4,
                        store_dtype="float32", shuffle=False, skip_first=1)
    store = harvest(loaded, seqs, tmp_path, cfg)
    rows = store.load(0)
    want = torch.cat([full_forward_rows(loaded, [s], 1, 1) for s in seqs])[:100]
    assert store.n_tokens == 100 and rows.shape == (100, 32)
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)


class Interrupted(Exception):
    pass


def interrupt_after(items, n):
    for i, item in enumerate(items):
        if i == n:
            raise Interrupted
        yield item


def test_harvest_bounded_shuffled_and_resumable(loaded, tmp_path, monkeypatch):
    seqs = sequences(loaded.tokenizer)
    cfg = HarvestConfig(layer=0, tokens=700, context_len=16, batch_size=4, shard_tokens=40,
                        window_tokens=100, store_dtype="float32", seed=3)
    windows = []
    write = harvest_mod._write_window
    monkeypatch.setattr(harvest_mod, "_write_window",
                        lambda f, m, rows, c: (windows.append(len(rows)), write(f, m, rows, c)))
    whole = harvest(loaded, seqs, tmp_path / "whole", cfg)
    assert max(windows) <= cfg.window_tokens + cfg.batch_size * 15  # the memory bound
    assert max(whole.chunk_sizes) <= cfg.shard_tokens and whole.n_tokens == 700

    with pytest.raises(Interrupted):  # killed in the middle of the fourth window
        harvest(loaded, interrupt_after(seqs, 30), tmp_path / "resumed", cfg)
    partial = ActivationStore(tmp_path / "resumed")
    assert not partial.complete and 0 < partial.n_tokens < 700
    resumed = harvest(loaded, seqs, tmp_path / "resumed", cfg)
    assert resumed.manifest["shards"] == whole.manifest["shards"]  # same files, same sha256
    torch.testing.assert_close(resumed.mean(), whole.mean())

    # shuffled rows are a permutation of the unshuffled ones
    plain = harvest(loaded, seqs, tmp_path / "plain", HarvestConfig(
        **{**cfg.__dict__, "shuffle": False}))
    a = torch.cat([whole.load(i) for i in range(len(whole.chunk_sizes))])
    b = torch.cat([plain.load(i) for i in range(len(plain.chunk_sizes))])
    assert not torch.equal(a, b)
    key = torch.randn(32, dtype=torch.float64)
    assert torch.equal(a[(a.double() @ key).argsort()], b[(b.double() @ key).argsort()])


def test_harvest_refuses_other_settings_on_restart(loaded, tmp_path):
    seqs = sequences(loaded.tokenizer)
    cfg = HarvestConfig(layer=0, tokens=50, context_len=16, batch_size=4, shard_tokens=40,
                        window_tokens=40)
    harvest(loaded, seqs, tmp_path, cfg)
    with pytest.raises(LatentAuditError, match="'layer' is 0 but this run asks for 1"):
        harvest(loaded, seqs, tmp_path, HarvestConfig(**{**cfg.__dict__, "layer": 1}))


def test_corrupted_shard_is_refused(loaded, tmp_path):
    cfg = HarvestConfig(layer=0, tokens=50, context_len=16, batch_size=4, shard_tokens=40,
                        window_tokens=40)
    store = harvest(loaded, sequences(loaded.tokenizer), tmp_path, cfg)
    path = tmp_path / store.manifest["shards"][0]["file"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LatentAuditError, match=r"shard-000000.*sha256.*harvest again"):
        store.load(0)
    path.write_bytes(bytes(data[:20]))  # a truncated header, read without the hash check
    with pytest.raises(LatentAuditError, match="not a readable activation shard"):
        ActivationStore(tmp_path, verify=False).load(0)


def test_iter_batches_epochs_and_seeking():
    x = torch.arange(50.0)[:, None].repeat(1, 2)
    src = TensorChunks(x, 15)
    stream = iter_batches(src, 7, seed=1)
    first = torch.cat([next(stream) for _ in range(14)])  # 98 rows: almost two epochs
    assert sorted(first[:50, 0].tolist()) == list(range(50))  # an epoch visits every row once
    assert not torch.equal(first[:50], first[50:98])  # the next epoch has another order
    later = iter_batches(src, 7, seed=1, start_row=35)
    torch.testing.assert_close(next(later), first[35:42])


# -- training -------------------------------------------------------------------------------
def test_lr_schedule_and_geometric_median():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == 1.0 and lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.randn(40, 3, generator=g), torch.full((5, 3), 50.0)])
    m = geometric_median(pts).double()
    unit = (pts.double() - m) / (pts.double() - m).norm(dim=1, keepdim=True)
    assert unit.sum(0).norm() < 1e-3  # the gradient of Σ||x_i - m|| vanishes
    cost = lambda c: (pts.double() - c).norm(dim=1).sum()  # noqa: E731
    assert cost(m) < cost(pts.double().mean(0))


def test_decoder_gradient_projection():
    W = torch.nn.functional.normalize(torch.randn(5, 4), dim=1).requires_grad_(True)
    W.grad = torch.randn(5, 4)
    project_decoder_grad(W)
    assert (W.grad * W).sum(1).abs().max() < 1e-6


@pytest.mark.slow  # about 8 s on two CPU cores: trains an SAE to convergence
def test_planted_dictionary_is_recovered():
    x, D = planted(32768)
    src = TensorChunks(x, 8192)
    cfg = TrainConfig(d_sae=1024, k=4, tokens=400 * 512, batch_size=512, lr=5e-3,
                      dead_tokens=20_000, checkpoint_every=0, seed=1)
    trainer = Trainer.start(cfg, src)
    trainer.fit(src, show_progress=False)
    sae = trainer.export()
    cos = (D @ sae.decoder_directions().T).max(1).values  # (m,) best match per true direction
    assert (cos >= 0.9).float().mean() >= 0.9
    assert sae.info.activation == "topk" and sae.info.k == 4 and sae.info.subtract_b_dec
    # the exported SAE reads raw activations: the input scale is folded into b_enc and b_dec
    s = trainer.scale
    assert s != pytest.approx(1.0)
    with torch.no_grad():
        torch.testing.assert_close(sae(x[:256]), trainer.sae(x[:256] * s) / s,
                                   rtol=1e-4, atol=1e-5)
        assert fvu(x[:4096], sae(x[:4096])) < 0.3


def train_with_dead_latents(x, auxk_coef):
    src = TensorChunks(x, 8192)
    cfg = TrainConfig(d_sae=512, k=4, tokens=300 * 512, batch_size=512, lr=5e-3, k_aux=32,
                      dead_tokens=2048, auxk_coef=auxk_coef, checkpoint_every=0)
    trainer = Trainer.start(cfg, src)
    with torch.no_grad():  # half the latents start too weak to ever win the top-k
        trainer.sae.W_enc[:, :256] *= 0.02
    trainer.fit(src, show_progress=False)
    with torch.no_grad():
        acts = trainer.export().encode(x[:8192])
    return (acts[:, :256] != 0).any(0).float().mean().item(), trainer


@pytest.mark.slow  # about 8 s on two CPU cores: trains an SAE to convergence
def test_auxk_revives_dead_latents():
    x, _ = planted(32768)
    revived, with_aux = train_with_dead_latents(x, 1 / 32)
    still_dead, without = train_with_dead_latents(x, 0.0)
    assert still_dead == 0.0  # nothing else gives a latent outside the top-k a gradient
    assert revived >= 0.15
    assert with_aux.history[-1]["dead"] < without.history[-1]["dead"] == 0.5


def test_resume_reproduces_uninterrupted_training(tmp_path):
    x, _ = planted(3000, d=16, m=64, k=3)
    src = TensorChunks(x, 700)  # several chunks and epochs: the data position must be exact
    cfg = TrainConfig(d_sae=128, k=3, tokens=60 * 128, batch_size=128, lr=3e-3, dead_tokens=300,
                      checkpoint_every=20, log_every=10, b_dec_init="geometric_median")
    whole = Trainer.start(cfg, src)
    whole.fit(src, show_progress=False)

    first = Trainer.start(cfg, src)
    first.fit(src, checkpoint_dir=tmp_path, stop_at=30, show_progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint.json", "state-000000030.safetensors"]  # older state removed
    resumed = Trainer.resume(tmp_path)
    assert resumed.step == 30
    resumed.fit(src, show_progress=False)
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    assert torch.equal(whole.since_fired, resumed.since_fired)
    assert whole.history == resumed.history

    with pytest.raises(LatentAuditError, match="'k' was 3 but this run asks for 4"):
        Trainer.resume(tmp_path, cfg=TrainConfig(**{**cfg.__dict__, "k": 4}))


def test_config_validation():
    with pytest.raises(LatentAuditError, match="--k 9 must be between 1 and --d-sae 8"):
        TrainConfig(d_sae=8, k=9, tokens=100, batch_size=10)
    with pytest.raises(LatentAuditError, match="--tokens 5"):
        TrainConfig(d_sae=8, k=2, tokens=5, batch_size=10)
    with pytest.raises(LatentAuditError, match="b_dec_init"):
        TrainConfig(d_sae=8, k=2, tokens=100, batch_size=10, b_dec_init="median")
    with pytest.raises(LatentAuditError, match="skip_first"):
        HarvestConfig(layer=0, tokens=10, context_len=4, skip_first=3)


# -- metrics --------------------------------------------------------------------------------
def test_metrics_on_hand_built_cases():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # mean 0, Σ||x||² = 10
    assert fvu(x, x) == 0.0
    assert fvu(x, torch.zeros_like(x)) == pytest.approx(1.0)
    assert fvu(x, x + torch.tensor([1.0, 0.0])) == pytest.approx(4 / 10)
    acts = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    assert l0(acts) == pytest.approx(4 / 3)
    assert dead_fraction(acts) == 0.5


def exact_sae(d_model: int, mean: torch.Tensor) -> SAE:
    """relu(x) - relu(-x) = x: a 2·d_model-latent SAE that reconstructs exactly."""
    eye = torch.eye(d_model)
    return SAE(torch.cat([eye, -eye], 1), torch.zeros(2 * d_model), torch.cat([eye, -eye]),
               torch.zeros(d_model), info=SAEInfo(activation="relu"), mean_activation=mean)


def test_ce_increase_exact_sae_is_zero_and_mean_sae_is_ablation(loaded):
    ids = torch.tensor(sequences(loaded.tokenizer)[:6])
    mean = full_forward_rows(loaded, ids.tolist(), 0, 1).mean(0).detach()
    r = ce_loss_increase(loaded.model, exact_sae(32, mean), ids, 0, mean)
    assert r.increase == 0.0 and r.ablated > r.clean and r.increase_pct == 0.0
    # an SAE that always outputs ā is mean ablation: 100 % of its increase
    zero = SAE(torch.zeros(32, 4), torch.zeros(4), torch.zeros(4, 32), mean,
               info=SAEInfo(activation="relu"))
    r = ce_loss_increase(loaded.model, zero, ids, 0, mean)
    assert r.spliced == pytest.approx(r.ablated) and r.increase_pct == pytest.approx(100.0)
    logits = loaded.model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    assert r.clean == pytest.approx(float(want), rel=1e-5)
    ev = evaluate_sae(loaded.model, exact_sae(32, mean), ids.tolist(), 0, mean, batch_size=4)
    assert ev.fvu < 1e-10 and ev.ce.increase == 0.0 and ev.tokens == 6 * 15
    assert ev.l0 == pytest.approx(32.0, abs=0.1)


def test_evaluate_saes_shares_passes_and_limits_ce(loaded):
    """Several SAEs in one pass equal one at a time; CE reads only the first sequences."""
    seqs = sequences(loaded.tokenizer)[:6]
    mean = full_forward_rows(loaded, seqs, 0, 1).mean(0).detach()
    torch.manual_seed(0)
    rand = SAE(torch.randn(32, 64), torch.zeros(64), torch.randn(64, 32) / 8, mean,
               info=SAEInfo(activation="topk", k=4))
    both = evaluate_saes(loaded.model, [exact_sae(32, mean), rand], seqs, 0, mean, batch_size=4,
                         ce_sequences=3)
    alone = evaluate_sae(loaded.model, rand, seqs, 0, mean, batch_size=4, ce_sequences=3)
    assert both[1].fvu == pytest.approx(alone.fvu) and both[1].ce == pytest.approx(alone.ce)
    assert both[0].fvu < 1e-10 and both[1].fvu > 0.01 and both[1].l0 == pytest.approx(4.0)
    assert both[0].tokens == 6 * 15 and both[0].ce_tokens == 3 * 15
    # the CE part equals ce_loss_increase on exactly the first three sequences
    ce = ce_loss_increase(loaded.model, rand, torch.tensor(seqs[:3]), 0, mean)
    assert both[1].ce == pytest.approx(ce, rel=1e-6)
    fired = (rand.encode(full_forward_rows(loaded, seqs, 0, 1)) != 0).any(0)
    assert both[1].dead_fraction == pytest.approx(1 - fired.double().mean().item())


# -- the command line -----------------------------------------------------------------------
def test_train_sae_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    from latentaudit.cli import main
    from latentaudit.saes import load_sae

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(documents(200)), encoding="utf-8")
    out = tmp_path / "sae"
    argv = ["train-sae", "--model", str(tiny_model_dir), "--layer", "1", "--d-sae", "64",
            "--k", "4", "--tokens", "3000", "--batch-size", "128", "--context-len", "32",
            "--shard-tokens", "500", "--window-tokens", "1000", "--out", str(out),
            "--corpus", str(corpus), "--device", "cpu", "--eval-sequences", "4",
            "--checkpoint-every", "10"]
    assert main(argv) == 0
    assert "Saved the SAE" in capsys.readouterr().out
    sae = load_sae(out)
    assert sae.info.activation == "topk" and sae.info.k == 4 and sae.info.layer == 1
    assert sae.d_sae == 64 and sae.d_model == 32
    store = ActivationStore(out / "activations")
    torch.testing.assert_close(sae.mean_activation, store.mean())
    assert store.n_tokens == 3000
    training = sae.info.extra["training"]
    assert training["tokens"] == 23 * 128 and training["data"].startswith("corpus ")
    metrics = training["metrics"]
    assert 0 <= metrics["fvu"] < 1 and metrics["l0"] <= 4 and metrics["eval_tokens"] == 4 * 31
    assert math.isfinite(metrics["ce_increase"]) and "--layer 1" in training["command"]
    norms = load_file(str(out / "sae.safetensors"))["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(64))

    assert main(argv) == 2  # the folder holds a run: refused without --resume
    assert "pass --resume" in capsys.readouterr().err
    before = json.loads((out / "cfg.json").read_text())
    assert main([*argv, "--resume"]) == 0  # nothing left to do: the same SAE again
    after = json.loads((out / "cfg.json").read_text())
    assert after["training"]["metrics"] == before["training"]["metrics"]


def test_train_sae_cli_resumes_a_killed_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A run stopped after its step-10 checkpoint continues from there and ends where an
    uninterrupted run ends."""
    from latentaudit.cli import main
    from latentaudit.saes import load_sae
    from latentaudit.saes.train import Trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(documents(120)), encoding="utf-8")

    def argv(out):
        return ["train-sae", "--model", str(tiny_model_dir), "--layer", "1", "--d-sae", "32",
                "--k", "4", "--tokens", "2048", "--batch-size", "128", "--context-len", "32",
                "--shard-tokens", "500", "--window-tokens", "1000", "--out", str(out),
                "--corpus", str(corpus), "--device", "cpu", "--eval-sequences", "2",
                "--checkpoint-every", "10"]

    assert main(argv(tmp_path / "whole")) == 0
    real_step = Trainer.train_step
    steps = []

    def dying_step(self, x):
        if self.step == 13:
            raise KeyboardInterrupt
        steps.append(self.step)
        return real_step(self, x)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    assert main(argv(tmp_path / "cut")) == 130
    assert "interrupted; finished work is kept" in capsys.readouterr().err
    saved = json.loads((tmp_path / "cut" / "checkpoint" / "checkpoint.json").read_text())
    assert saved["step"] == 10
    steps.clear()
    monkeypatch.setattr(Trainer, "train_step", lambda self, x: (steps.append(self.step),
                                                                real_step(self, x))[1])
    assert main([*argv(tmp_path / "cut"), "--resume"]) == 0
    assert steps[0] == 10 and steps[-1] == 15  # continued from the checkpoint, not step 0
    whole, cut = load_sae(tmp_path / "whole"), load_sae(tmp_path / "cut")
    torch.testing.assert_close(cut.W_dec, whole.W_dec)
    torch.testing.assert_close(cut.b_enc, whole.b_enc)
    capsys.readouterr()


def test_train_sae_checks_the_corpus_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from latentaudit.cli import main
    from latentaudit.saes import pipeline

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the corpus was checked")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    argv = ["train-sae", "--model", "qwen2.5-0.5b-instruct", "--layer", "0", "--d-sae", "16",
            "--k", "2", "--tokens", "256", "--batch-size", "64", "--out", str(tmp_path / "o"),
            "--corpus", str(tmp_path / "missing.txt"), "--device", "cpu"]
    assert main(argv) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err


def test_train_sae_cli_bad_corpus(tiny_model_dir, tmp_path, capsys):
    from latentaudit.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    argv = ["train-sae", "--model", str(tiny_model_dir), "--layer", "0", "--d-sae", "16",
            "--k", "2", "--tokens", "256", "--batch-size", "64", "--out", str(tmp_path / "o"),
            "--corpus", str(bad), "--device", "cpu"]
    assert main(argv) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_train_sae_cli_without_corpus_says_how_to_get_one(tiny_model_dir, tmp_path, capsys,
                                                          monkeypatch):
    from latentaudit.cli import main

    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "empty-cache"))
    argv = ["train-sae", "--model", str(tiny_model_dir), "--layer", "0", "--d-sae", "16",
            "--k", "2", "--tokens", "256", "--batch-size", "64", "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "latentaudit data fetch" in err and "Traceback" not in err
    assert main([*argv, "--store-dtype", "int3"]) == 2
    assert "store_dtype 'int3'" in capsys.readouterr().err


def test_sae_evaluate_cli_on_texts(tiny_model_dir, tmp_path, capsys):
    """`sae evaluate` reports the numbers evaluate_saes computes, per SAE and text."""
    from latentaudit.cli import main
    from latentaudit.models.load import load_model
    from latentaudit.saes import load_sae
    from latentaudit.saes.evaluate import EvalConfig, text_sequences

    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(documents(60)), encoding="utf-8")
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    cfg = EvalConfig(tokens=200, ce_tokens=62, context_len=32)
    seqs = text_sequences(str(text), loaded.tokenizer, cfg)
    assert len(seqs) == 7 and all(len(s) == 32 for s in seqs)  # ceil(200 / 31)
    mean = full_forward_rows(loaded, seqs, 1, 1).mean(0).detach()
    exact = exact_sae(32, mean)
    exact.info.layer = 1
    exact.save(tmp_path / "exact")
    argv = ["sae", "evaluate", str(tmp_path / "exact"), "--model", str(tiny_model_dir),
            "--text", str(text), "--tokens", "200", "--ce-tokens", "62", "--device", "cpu",
            "--json"]
    with pytest.raises(SystemExit):  # --context-len is not an option: 128 is too long here
        main([*argv, "--context-len", "32"])
    capsys.readouterr()
    sae = load_sae(tmp_path / "exact")
    want = evaluate_sae(loaded.model, sae, text_sequences(str(text), loaded.tokenizer,
                                                          EvalConfig(200, 62)), 1, mean,
                        ce_sequences=1)
    assert main([*argv, "--record"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["text"] == str(text) and row["fvu"] < 1e-10 and row["ce_increase"] == 0.0
    assert row["tokens"] == want.tokens and row["ce_tokens"] == want.ce_tokens
    assert row["ce_clean"] == pytest.approx(want.ce.clean)
    recorded = json.loads((tmp_path / "exact" / "cfg.json").read_text())["evaluation"]
    assert recorded["results"][str(text)]["fvu"] == row["fvu"]
    assert "sae evaluate" in recorded["results"][str(text)]["command"]
    assert load_sae(tmp_path / "exact").d_sae == 64
    # a missing text fails before the model loads
    assert main([*argv[:-7], "--text", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: no such file" in capsys.readouterr().err


def test_decoder_gradient_projection_records_no_graph():
    """The projected gradient must be a plain tensor: a recorded graph grows every step."""
    import latentaudit.saes.train as T

    W = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_(True)
    (W * torch.randn(8, 4)).sum().backward()
    T.project_decoder_grad(W)
    assert W.grad.grad_fn is None and not W.grad.requires_grad
    torch.testing.assert_close((W.grad * W).sum(1), torch.zeros(8), atol=1e-6, rtol=0)


def test_sae_evaluate_on_a_sample_file_reads_each_completion_with_its_prompt(tmp_path):
    """A `latentaudit sample` output is evaluated as its own sequences (prompt + completion
    token ids, not packed text), up to the token budget; a broken row later on is named."""
    from latentaudit.saes.evaluate import EvalConfig, text_sequences

    rows = [{"prompt_id": f"p{i}", "sample_index": 0, "completion": "x",
             "prompt_token_ids": [1, 2, 3 + i], "completion_token_ids": list(range(5, 5 + i))}
            for i in range(1, 6)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    seqs = text_sequences(str(path), None, EvalConfig(tokens=1000))
    assert seqs == [r["prompt_token_ids"] + r["completion_token_ids"] for r in rows]
    # 3 + 4 = 7 evaluated positions (the first of each is skipped) reach a budget of 7
    assert text_sequences(str(path), None, EvalConfig(tokens=7)) == seqs[:2]
    path.write_text(path.read_text() + json.dumps({"text": "prose"}) + "\n", encoding="utf-8")
    with pytest.raises(LatentAuditError, match=r"s\.jsonl:6: field 'completion_token_ids'"):
        text_sequences(str(path), None, EvalConfig(tokens=1000))
