"""One device done right, tested on the CPU: automatic batch sizes, the out-of-memory retry
(a fake torch.OutOfMemoryError above a batch size gives the unsplit result), SAEs streamed in
latent chunks (equal to the whole SAE), hooks and sums on the hooked layer's device (a mocked
device map and ``--device auto-map`` on a CPU-only machine), and bfloat16 on a tiny model.

Tolerances: float64 models and SAEs are compared to 1e-10 relative (a split batch or a latent
chunk changes only the order of float sums); bfloat16 against float32 is compared by ranking,
since bfloat16 keeps about 3 significant digits.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

import pytest
import torch

from latentaudit import batching
from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.batching import BatchGuard, auto_batch_size, model_shape, row_bytes
from latentaudit.models.hooks import RowSteering, layer_device, layer_module
from latentaudit.models.load import load_model, prepare
from latentaudit.saes import stream
from latentaudit.saes.stream import direction_chunks, encode_chunks, place
from latentaudit.sample import SampleConfig, generate
from test_attribute import make_data
from tiny import random_sae, tiny_model, tiny_tokenizer

TIGHT = dict(rtol=1e-10, atol=1e-12)


def loaded(dtype=torch.float64, layers=3, seed=0):
    return prepare(tiny_model("llama", dtype=dtype, layers=layers, seed=seed), tiny_tokenizer(),
                   name="tiny-llama")


def oom_above(limit: int):
    """An exception raiser for batches of more than ``limit`` rows, as a full device would."""
    def check(rows: int) -> None:
        if rows > limit:
            raise torch.OutOfMemoryError(f"fake: {rows} rows do not fit")
    return check


@pytest.fixture(autouse=True)
def fresh_guards(monkeypatch):
    """Each test starts without limits learned by an earlier one."""
    monkeypatch.setattr(batching, "_GUARDS", batching.weakref.WeakKeyDictionary())


# -- the guard ---------------------------------------------------------------------------------

def test_guard_halves_a_batch_keeps_the_order_and_logs_once(caplog):
    check, calls = oom_above(3), []

    def fn(part):
        calls.append(list(part))
        check(len(part))
        return [x * 10 for x in part]

    guard = BatchGuard("test stage")
    with caplog.at_level(logging.WARNING, logger="latentaudit.batching"):
        out = guard.run(list(range(10)), fn)
        out2 = guard.run(list(range(10, 15)), fn)
    assert [x for part in out for x in part] == [x * 10 for x in range(10)]
    assert [x for part in out2 for x in part] == [x * 10 for x in range(10, 15)]
    assert guard.limit == 2  # 10 → 5 → 2 rows
    assert calls[:3] == [list(range(10)), list(range(5)), [0, 1]]
    assert all(len(c) <= 2 for c in calls[3:])  # the next batch starts at the learned limit
    assert len([r for r in caplog.records if "out of device memory" in r.message]) == 1


def test_guard_one_row_that_does_not_fit_is_a_clear_error():
    from latentaudit.errors import LatentAuditError

    with pytest.raises(LatentAuditError, match="one row does not fit"):
        BatchGuard("attribute").run([1, 2], lambda part: oom_above(0)(len(part)))


# -- automatic batch size ----------------------------------------------------------------------

def test_auto_batch_size_from_free_memory(monkeypatch):
    shape = model_shape(tiny_model("llama", layers=2))
    assert shape.d_model == 32 and shape.layers == 2 and shape.kv_dim == 16 and shape.elem == 4
    per_row = row_bytes(shape, "backward", 100, logit_tokens=50)
    assert per_row < row_bytes(shape, "backward", 200, logit_tokens=50)
    assert row_bytes(shape, "forward", 100) < per_row
    assert auto_batch_size("cpu", per_row, fallback=7) == 7  # the CPU cannot report free memory
    monkeypatch.setattr(batching, "free_memory", lambda device: 10 * per_row)
    assert auto_batch_size("cuda", per_row, fallback=7) == int(10 * batching.HEADROOM)
    monkeypatch.setattr(batching, "free_memory", lambda device: 10**15)
    assert auto_batch_size("cuda", per_row, fallback=7) == batching.MAX_AUTO_BATCH


def test_batch_size_auto_on_the_command_line():
    import argparse

    from latentaudit.cli import batch_size_arg

    assert batch_size_arg("auto") == 0 and batch_size_arg("12") == 12
    for bad in ("0", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto"):
            batch_size_arg(bad)


def test_auto_batch_size_attribution_equals_fixed(monkeypatch):
    lm, sae = loaded(), random_sae(32, 24, layer=1).double()
    fixed = attribute(lm, sae, make_data(), AttributionConfig(batch_size=3)).layers[1]
    monkeypatch.setattr(batching, "free_memory", lambda device: 10**12)
    auto = attribute(lm, sae, make_data(), AttributionConfig(batch_size=0))
    assert auto.config.batch_size == batching.MAX_AUTO_BATCH  # resolved and recorded
    torch.testing.assert_close(auto.layers[1].delta_attribution, fixed.delta_attribution, **TIGHT)


# -- out-of-memory retry gives the unsplit result ----------------------------------------------

def test_attribution_retry_on_out_of_memory_equals_the_unsplit_run(monkeypatch, caplog):
    import latentaudit.attribution.accumulate as acc

    lm, sae = loaded(), random_sae(32, 24, layer=1).double()
    cfg = AttributionConfig(batch_size=8)
    whole = attribute(lm, sae, make_data(), cfg)
    real, check = acc.forward_backward, oom_above(2)

    def tight(model, batch, *a, **k):
        check(batch.input_ids.shape[0])
        return real(model, batch, *a, **k)

    monkeypatch.setattr(acc, "forward_backward", tight)
    with caplog.at_level(logging.WARNING, logger="latentaudit.batching"):
        split = attribute(lm, sae, make_data(), cfg)
    assert sum("out of device memory" in r.message for r in caplog.records) == 1
    a, b = whole.layers[1], split.layers[1]
    for name in ("delta_attribution", "delta_activation", "moment_matrix", "a_bar"):
        torch.testing.assert_close(getattr(b, name).double(), getattr(a, name).double(),
                                   rtol=1e-6, atol=1e-9)  # stored as float32
    torch.testing.assert_close(torch.tensor(split.completion_losses),
                               torch.tensor(whole.completion_losses), **TIGHT)
    assert split.n_tokens == whole.n_tokens
    assert [r.latent for r in split.ranking] == [r.latent for r in whole.ranking]


def test_generation_retry_on_out_of_memory_gives_the_same_completions(monkeypatch):
    lm = loaded(torch.float32)
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
    seeds = [3, 1, 4, 1, 5]
    cfg = SampleConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)
    vectors = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)) * 4
    whole = generate(lm, ids, seeds, cfg, steering=RowSteering(1, vectors))
    real, check = lm.model.forward, oom_above(2)

    @functools.wraps(real)  # the same signature, so generate passes the cache as it would
    def tight(*a, **k):
        check(k["input_ids"].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(lm.model, "forward", tight)
    split = generate(lm, ids, seeds, cfg, steering=RowSteering(1, vectors))
    assert split == whole
    assert batching.guard_for(lm.model, "generate").limit == 2


def test_explain_scan_retry_on_out_of_memory_keeps_the_same_examples(tmp_path, monkeypatch):
    import json
    import random

    import latentaudit.explain.examples as examples
    from latentaudit.explain import ExplainConfig

    rng = random.Random(0)  # random text, and no example in a sequence's first 4 positions:
    # equal beginnings would tie exactly, and the order of exact ties is free
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "".join(rng.choice("abcdefghij klmnop,.")
                                                          for _ in range(90))}) + "\n"
                              for _ in range(8)))
    cfg = ExplainConfig(corpus=str(corpus), corpus_tokens=300, context_len=24, examples=4,
                        batch_size=4, skip_first=4)
    lm, sae = loaded(), random_sae(32, 40, layer=1).double()
    whole = examples.corpus_examples(lm, sae, 1, cfg, "k", tmp_path / "a")
    real, check = examples.merge_batch, oom_above(1)

    def tight(model, sae, layer, ids, *a, **k):
        check(ids.shape[0])
        return real(model, sae, layer, ids, *a, **k)

    monkeypatch.setattr(examples, "merge_batch", tight)
    split = examples.corpus_examples(lm, sae, 1, cfg, "k", tmp_path / "b")
    assert split.tokens == whole.tokens and split.sequences == whole.sequences
    for a, b in zip(whole.top + whole.density, split.top + split.density, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


# -- SAE streamed in latent chunks -------------------------------------------------------------

@pytest.mark.parametrize("activation,k,norm", [("relu", None, "none"), ("jumprelu", None, "none"),
                                               ("topk", 5, "none"), ("topk", 3, "layer_norm")])
def test_encoder_in_latent_chunks_equals_the_whole_encoder(activation, k, norm):
    sae = random_sae(16, 50, activation=activation, k=k).double()
    sae.info.input_norm = norm
    x = torch.randn(9, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full = sae.encode(x)  # (9, 50)
    for chunk in (1, 7, 50, 64):
        got = torch.cat([f for _, f in encode_chunks(sae, x, chunk)], dim=1)
        torch.testing.assert_close(got, full, **TIGHT)


def test_decoder_in_chunks_gives_the_same_attribution_contraction():
    from latentaudit.attribution.finish import contract
    from latentaudit.attribution.math import deltas_from_moments

    sae = random_sae(16, 45).double()
    M = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = deltas_from_moments(M, sae.decoder_directions(torch.float64), dtype=torch.float64)
    for chunk in (1, 8, 45, 100):
        torch.testing.assert_close(contract(M, sae, chunk, torch.float64), full, **TIGHT)
    rows = torch.cat([d for _, d in direction_chunks(sae, 8, "cpu", torch.float64)])
    torch.testing.assert_close(rows, sae.decoder_directions(torch.float64), **TIGHT)
    torch.testing.assert_close(sae.decoder_directions(rows=[4, 0]),
                               sae.decoder_directions()[[4, 0]])


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4)])
def test_attribution_with_a_streamed_sae_equals_the_whole_sae(activation, k):
    lm = loaded()
    sae = random_sae(32, 30, layer=1, activation=activation, k=k).double()
    whole = attribute(lm, sae, make_data(), AttributionConfig(batch_size=4)).layers[1]
    streamed = attribute(lm, sae, make_data(), AttributionConfig(batch_size=4, sae_chunk=7))
    torch.testing.assert_close(streamed.layers[1].delta_attribution, whole.delta_attribution,
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(streamed.layers[1].delta_activation, whole.delta_activation,
                               rtol=1e-6, atol=1e-9)


def test_explain_scan_with_a_streamed_sae_equals_the_whole_sae():
    import latentaudit.explain.examples as examples
    from latentaudit.explain import ExplainConfig
    from latentaudit.explain.topk import empty_density, empty_topk

    lm = loaded()
    sae = random_sae(32, 40, layer=1, activation="topk", k=6).double()
    cfg = ExplainConfig(examples=3, context_before=2, context_after=1, skip_first=1)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 250, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a shorter row
    state = empty_topk(40, 3, 2, 1), empty_density(40)
    whole = examples.merge_batch(lm.model, sae, 1, ids, mask, 0, *state, cfg)
    for chunk in (1, 9, 40):
        got = examples.merge_batch(lm.model, sae, 1, ids, mask, 0, *state, cfg, chunk)
        for a, b in zip(whole[0] + whole[1], got[0] + got[1], strict=True):
            torch.testing.assert_close(b, a, **TIGHT)
        assert got[2] == whole[2]


def test_place_streams_an_sae_that_does_not_fit(monkeypatch):
    sae = random_sae(32, 64)
    assert place(sae, "cpu") == 64  # free memory unknown: the whole SAE goes to the device
    assert place(sae, "cpu", chunk=10) == 10
    size = stream.sae_bytes(sae)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no pinning on this machine
    monkeypatch.setattr(stream, "free_memory", lambda device: 4 * size)  # fits
    assert place(sae, "cpu") == 64
    monkeypatch.setattr(stream, "free_memory", lambda device: size // 4)  # does not fit
    n = place(sae, "cpu")
    assert 1 <= n < 64 and sae.W_dec.device.type == "cpu"


# -- devices: hooks and sums on the hooked layer's device --------------------------------------

def test_layer_device_reads_the_execution_device_of_a_dispatched_layer():
    model = tiny_model("llama", layers=2)
    assert layer_device(model, 1) == torch.device("cpu")

    class Hook:  # what accelerate attaches to a layer it dispatched
        execution_device = "meta"

    layer_module(model, 1)._hf_hook = Hook()
    assert layer_device(model, 1) == torch.device("meta")
    assert layer_device(model, 0) == torch.device("cpu")


def test_attribution_places_each_sae_on_its_layer_device(monkeypatch):
    """A mocked device map: the SAE, the sums and the contraction follow ``layer_device``."""
    import latentaudit.attribution.engine as engine

    lm, sae = loaded(), random_sae(32, 24, layer=1).double()
    asked = []

    def mapped(model, layer):
        asked.append(layer)
        return torch.device("cpu")

    placed = []
    real_place = engine.place
    monkeypatch.setattr(engine, "layer_device", mapped)
    monkeypatch.setattr(engine, "place", lambda s, dev, chunk: (placed.append(dev),
                                                               real_place(s, dev, chunk))[1])
    attribute(lm, sae, make_data(), AttributionConfig(batch_size=4))
    assert asked == [1] and placed == [torch.device("cpu")]


def test_steering_vectors_move_to_the_hooked_layer_once(monkeypatch):
    import latentaudit.generate as gen

    lm = loaded(torch.float32)
    moved = []
    real = gen.layer_device
    monkeypatch.setattr(gen, "layer_device", lambda m, L: (moved.append(L), real(m, L))[1])
    vectors = torch.zeros(2, 32)
    plain = generate(lm, [[5, 6], [7]], [1, 2], SampleConfig(max_new_tokens=4))
    steered = generate(lm, [[5, 6], [7]], [1, 2], SampleConfig(max_new_tokens=4),
                       steering=RowSteering(2, vectors))
    assert moved == [2] and steered == plain  # zero vectors change nothing


def test_auto_map_loads_a_model_on_the_cpu_and_attributes_the_same(tiny_model_dir):
    pytest.importorskip("accelerate")
    cpu = load_model(str(tiny_model_dir), device="cpu", dtype="float64")
    spread = load_model(str(tiny_model_dir), device="auto-map", dtype="float64")
    assert spread.device == torch.device("cpu")
    assert layer_device(spread.model, 1) == torch.device("cpu")
    sae = random_sae(32, 24, layer=1).double()
    a = attribute(cpu, sae, make_data(), AttributionConfig(batch_size=4)).layers[1]
    b = attribute(spread, sae, make_data(), AttributionConfig(batch_size=4)).layers[1]
    torch.testing.assert_close(b.delta_attribution, a.delta_attribution, **TIGHT)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_auto_map_over_two_gpus_equals_one_device(tiny_model_dir):  # pragma: no cover
    one = load_model(str(tiny_model_dir), device="cuda:0", dtype="float32")
    spread = load_model(str(tiny_model_dir), device="auto-map", dtype="float32")
    sae = random_sae(32, 24, layer=1)
    a = attribute(one, sae, make_data(), AttributionConfig(batch_size=4)).layers[1]
    b = attribute(spread, sae, make_data(), AttributionConfig(batch_size=4)).layers[1]
    torch.testing.assert_close(b.delta_attribution, a.delta_attribution, rtol=1e-4, atol=1e-6)


# -- bfloat16 ----------------------------------------------------------------------------------

def test_bfloat16_attribution_on_the_cpu_ranks_like_float32():
    """The same tiny model in bfloat16 and float32: the sums are float32/float64 whatever the
    model dtype, so only the model's own rounding differs. Tolerance: the top-5 latents agree
    on at least 4, and Δ-attribution is within 10% of the float32 range."""
    from latentaudit.explain.exact import spearman

    sae = random_sae(32, 64, layer=1)
    full = attribute(loaded(torch.float32), sae, make_data(), AttributionConfig(batch_size=4))
    half = attribute(loaded(torch.bfloat16), sae, make_data(), AttributionConfig(batch_size=4))
    a, b = full.layers[1].delta_attribution, half.layers[1].delta_attribution
    assert b.dtype == torch.float32 and half.model.dtype == "bfloat16"
    assert (a - b).abs().max() <= 0.1 * a.abs().max()
    assert spearman(a, b) > 0.9
    assert len(set(a.topk(5).indices.tolist()) & set(b.topk(5).indices.tolist())) >= 4


def test_bfloat16_generation_runs_and_is_seeded():
    lm = loaded(torch.bfloat16)
    cfg = SampleConfig(max_new_tokens=5, temperature=1.0)
    a = generate(lm, [[5, 6], [7]], [1, 2], cfg)
    assert a == generate(lm, [[5, 6], [7]], [1, 2], cfg)
    assert all(len(g.token_ids) == 5 for g in a)


# -- sampling stays the same -------------------------------------------------------------------

def test_uniforms_drawn_per_row_equal_one_draw_per_step():
    from latentaudit.generate import row_uniforms

    got = row_uniforms([7, 2**62 + 1], 40)
    for row, seed in enumerate([7, 2**62 + 1]):
        g = torch.Generator().manual_seed(seed)
        want = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for _ in range(40)])
        assert torch.equal(got[row], want)


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's; resident memory is read from /proc")
def test_release_memory_gives_freed_heap_pages_back_to_the_system():
    def resident() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    blocks = [bytearray(4000) for _ in range(50_000)]  # 200 MB of heap blocks
    kept = blocks[::16]  # every 16th stays alive: the heap cannot shrink from its top
    del blocks
    before = resident()
    assert batching.release_memory()
    assert before - resident() > 100 * 2**20  # most of the 187 MB freed goes back
    assert len(kept) == 3125
