"""SAEs by their public names, read from a local hub cache laid out as ``huggingface_hub`` lays
it out (``models--org--repo/{blobs,refs,snapshots}``), offline, with the network blocked."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket

import numpy as np
import pytest
import torch

import latentaudit.models.load as model_load
from latentaudit.attribution import AttributionConfig, attribute
from latentaudit.errors import LatentAuditError
from latentaudit.saes import hub, load_sae, releases
from latentaudit.saes.shipped import resolve_sae_path
from test_attribution_plan import write_data
from tiny import save_tiny

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GS_RES = "google/gemma-scope-2b-pt-res"
GS_PATH = "layer_1/width_16k/canonical"
D, S = 32, 24


def gemma_params(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"W_enc": g.normal(size=(D, S)).astype(np.float32),
            "W_dec": g.normal(size=(S, D)).astype(np.float32),
            "b_enc": g.normal(size=S).astype(np.float32),
            "b_dec": g.normal(size=D).astype(np.float32),
            "threshold": g.uniform(0, 0.1, size=S).astype(np.float32)}


def put(cache, repo: str, files: dict[str, bytes], commit: str = COMMIT, ref: str = "main"):
    """Files of ``repo`` at ``commit`` in hub-cache layout: content in blobs/<sha256>, the
    snapshot a tree of relative symlinks to them, refs/<ref> holding the commit hash."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for rel, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (root / "blobs").mkdir(exist_ok=True)
        (root / "blobs" / sha).write_bytes(data)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("../" * (rel.count("/") + 2) + f"blobs/{sha}")
    return root


def npz_bytes(tmp_path, arrays) -> bytes:
    file = tmp_path / "params.npz"
    np.savez(file, **arrays)
    return file.read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline hub cache under HF_HOME with three repos, and no network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(releases, "_saelens_registry", lambda: None)

    def no_network(*args, **kwargs):
        raise AssertionError("a test of the hub cache opened a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    root = tmp_path / "hf" / "hub"
    params = npz_bytes(tmp_path, gemma_params(0))
    put(root, GS_RES, {f"{GS_PATH}/params.npz": params})
    put(root, "google/gemma-scope-2b-pt-mlp", {f"{GS_PATH}/params.npz": params})
    g = torch.Generator().manual_seed(1)
    from safetensors.torch import save

    sparsify = save({"encoder.weight": torch.randn(S, D, generator=g),
                     "encoder.bias": torch.randn(S, generator=g),
                     "W_dec": torch.randn(S, D, generator=g), "b_dec": torch.randn(D, generator=g)})
    cfg = json.dumps({"d_in": D, "num_latents": S, "k": 4}).encode()
    put(root, "EleutherAI/sae-llama-3-8b-32x", {
        f"layers.{i}/{name}": data for i in (0, 1)
        for name, data in (("cfg.json", cfg), ("sae.safetensors", sparsify))})
    return root


def test_the_cache_is_read_where_huggingface_hub_puts_it(cache):
    sae = load_sae(f"{GS_RES}/{GS_PATH}")
    blob = (cache / f"models--{GS_RES.replace('/', '--')}" / "snapshots" / COMMIT / GS_PATH /
            "params.npz").resolve()
    assert sae.info.source_path.startswith(str(cache))
    assert sae.info.hub == {"repo": GS_RES, "revision": COMMIT, "path": f"{GS_PATH}/params.npz",
                            "files": {f"{GS_PATH}/params.npz": blob.name},
                            "name": f"{GS_RES}/{GS_PATH}"}
    assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert (sae.info.layer, sae.info.hook, sae.info.model) == (1, "resid_post", "google/gemma-2-2b")
    assert torch.equal(sae.W_enc.detach(), torch.from_numpy(gemma_params(0)["W_enc"]))


def test_three_names_of_one_sae_load_the_same_tensors(cache, tmp_path):
    local = tmp_path / "local" / "gemma-scope-2b-pt-res" / GS_PATH
    local.mkdir(parents=True)
    shutil.copy(cache / f"models--{GS_RES.replace('/', '--')}" / "snapshots" / COMMIT / GS_PATH /
                "params.npz", local / "params.npz")
    by_repo = load_sae(f"{GS_RES}/{GS_PATH}")
    by_saelens = load_sae(f"saelens:gemma-scope-2b-pt-res-canonical/{GS_PATH}")
    by_path = load_sae(local)
    for other in (by_saelens, by_path):
        for name, t in by_repo.state_dict().items():
            assert torch.equal(t, other.state_dict()[name]), name
        assert (other.info.layer, other.info.hook) == (1, "resid_post")
    assert by_repo.info.extra["neuronpedia_id"] == "gemma-2-2b/1-gemmascope-res-16k"
    assert by_saelens.info.extra["neuronpedia_id"] == "gemma-2-2b/1-gemmascope-res-16k"
    assert by_saelens.info.hub["revision"] == COMMIT and by_path.info.hub is None


def test_pinned_revisions_and_sparsify_hookpoints(cache):
    assert load_sae(f"{GS_RES}@{COMMIT}/{GS_PATH}").info.hub["revision"] == COMMIT
    assert load_sae(f"{GS_RES}/{GS_PATH}", revision="main").info.hub["revision"] == COMMIT
    sae = load_sae("EleutherAI/sae-llama-3-8b-32x:layers.1")
    assert (sae.info.layer, sae.info.activation, sae.info.k) == (1, "topk", 4)
    assert sae.info.hub["path"] == "layers.1"
    assert set(sae.info.hub["files"]) == {"layers.1/cfg.json", "layers.1/sae.safetensors"}
    path = resolve_sae_path("saelens:sae-llama-3-8b-32x/layers.0", "any-model")
    assert path.endswith(f"{COMMIT}/layers.0") and load_sae(path).info.hub["path"] == "layers.0"


@pytest.mark.parametrize(("name", "kw", "message"), [
    (f"{GS_RES}@v9/{GS_PATH}", {}, "not in the local hub cache"),
    (f"{GS_RES}/{GS_PATH}", {"revision": "f" * 40}, "not in the local hub cache"),
    (f"{GS_RES}/layer_7/width_16k/canonical", {}, "has no file or folder 'layer_7/width_16k"),
    ("EleutherAI/sae-llama-3-8b-32x:layers.9", {}, "has no file or folder 'layers.9'"),
    ("nobody/nothing/sub", {}, "nobody/nothing is not in the local hub cache"),
    ("saelens:no-such-release/x", {}, r"pip install 'latentaudit\[saelens\]'"),
    ("saelens:gemma-scope-2b-pt-res-canonical/layer_1", {}, "is not an id of"),
    (f"{GS_RES}/{GS_PATH}", {"hook": "mlp_out"}, "reads the hook point resid_post"),
])
def test_each_bad_name_is_one_clear_error(cache, name, kw, message):
    with pytest.raises(LatentAuditError, match=message):
        load_sae(name, **kw)


@pytest.fixture
def loads(monkeypatch):
    calls = []
    monkeypatch.setattr(model_load, "load_model", lambda name, *a, **k: calls.append(name))
    return calls


@pytest.mark.parametrize(("sae", "message"), [
    (f"{GS_RES}@v9/{GS_PATH}", "no revision 'v9'|not in the local hub cache"),
    (f"{GS_RES}/layer_3/width_16k/canonical", "has no file or folder"),
    ("EleutherAI/sae-llama-3-8b-32x:layers.1", "reads resid_post of layer 1 but"),
    (f"google/gemma-scope-2b-pt-mlp/{GS_PATH}",
     "reads the hook point mlp_out but --hook resid_post was given"),
])
def test_hub_problems_fail_before_the_model_loads(cache, tmp_path, loads, sae, message):
    model = save_tiny(tmp_path / "model", layers=1)  # layers 0..0: layer 1 is not a hook point
    with pytest.raises(LatentAuditError, match=message):
        attribute(str(model), sae, write_data(tmp_path / "data.jsonl"),
                  AttributionConfig(hook="resid_post"))
    assert loads == []


def test_names_and_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "repo").mkdir(parents=True)
    assert hub.parse("org/repo") is None  # it exists on disk
    assert hub.parse("./x/y") is None and hub.parse("/x/y") is None and hub.parse("plain") is None
    ref = hub.parse("hf:a/b@v1/c/d:layers.3")
    assert (ref.repo, ref.revision, ref.path, ref.hookpoint) == ("a/b", "v1", "c/d", "layers.3")
    with pytest.raises(LatentAuditError, match="pins revision v1 but revision v2"):
        hub.parse("a/b@v1", revision="v2")


def test_the_manifest_says_which_hub_sae_a_run_used(cache, tmp_path):
    from latentaudit.attribution.output import manifest

    model = save_tiny(tmp_path / "model", layers=2)
    result = attribute(str(model), f"saelens:gemma-scope-2b-pt-res-canonical/{GS_PATH}",
                       write_data(tmp_path / "data.jsonl"))
    entry = manifest(result)["saes"]["1"]
    assert entry["hub"]["repo"] == GS_RES and entry["hub"]["revision"] == COMMIT
    assert entry["hub"]["files"] == {
        f"{GS_PATH}/params.npz": hashlib.sha256(open(entry["path"], "rb").read()).hexdigest()}
    assert entry["neuronpedia_id"] == "gemma-2-2b/1-gemmascope-res-16k"


def test_the_command_line_takes_hub_names(cache, tmp_path, capsys, loads):
    from latentaudit.cli import main

    base = ["attribute", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"),
            "--data", str(write_data(tmp_path / "data.jsonl"))]
    assert main([*base, "--sae", f"{GS_RES}/layer_5/width_16k/canonical"]) == 2
    assert "has no file or folder 'layer_5/width_16k/canonical'" in capsys.readouterr().err
    assert loads == []


def test_sae_info_names_the_hub_origin(cache, capsys):
    from latentaudit.cli import main

    name = f"saelens:gemma-scope-2b-pt-res-canonical/{GS_PATH}"
    assert main(["sae", "info", "--json", name]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["hub"] == f"{GS_RES}@{COMMIT}/{GS_PATH}/params.npz"
    assert shown["neuronpedia"] == "gemma-2-2b/1-gemmascope-res-16k"
    assert (shown["layer"], shown["hook"], shown["activation"]) == (1, "resid_post", "jumprelu")


def test_the_saelens_registry_is_used_when_installed(cache, monkeypatch):
    from types import SimpleNamespace

    entry = SimpleNamespace(repo_id=GS_RES, model="gemma-2-2b",
                            saes_map={"my-id": GS_PATH}, neuronpedia_id={"my-id": "np/x"})
    monkeypatch.setattr(releases, "_saelens_registry", lambda: {"some-release": entry})
    sae = load_sae("saelens:some-release/my-id")
    assert sae.info.hub["path"] == f"{GS_PATH}/params.npz"
    assert sae.info.extra["neuronpedia_id"] == "np/x"
    with pytest.raises(LatentAuditError, match="registry has no id 'other'"):
        load_sae("saelens:some-release/other")
    # a release the registry lacks still resolves through latentaudit's table
    assert load_sae(f"saelens:gemma-scope-2b-pt-res-canonical/{GS_PATH}").info.layer == 1


def test_digests_cover_the_files_of_subfolders(tmp_path):
    """A Llama Scope folder keeps its weights in checkpoints/: the manifest digests them too."""
    import hashlib

    from latentaudit.saes.hub import origin

    rev = "a" * 40
    folder = tmp_path / "models--org--scope" / "snapshots" / rev / "L3R"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text("{}")
    (folder / "checkpoints" / "final.safetensors").write_bytes(b"weights")
    got = origin(folder)
    assert (got["repo"], got["revision"], got["path"]) == ("org/scope", rev, "L3R")
    assert got["files"] == {"L3R/checkpoints/final.safetensors":
                            hashlib.sha256(b"weights").hexdigest(),
                            "L3R/hyperparams.json": hashlib.sha256(b"{}").hexdigest()}
