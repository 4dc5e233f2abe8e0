"""SAEs by their public names: Hugging Face hub repos and SAELens releases.

1. :func:`parse` reads a name: ``org/repo[@REVISION][/sub/folder-or-file][:hookpoint]`` (a hub
   repo, optionally pinned; ``:hookpoint`` picks a folder of an EleutherAI sparsify checkpoint;
   an ``hf:`` prefix forces the hub reading) or ``saelens:RELEASE/ID`` (resolved by
   :mod:`latentaudit.saes.releases`). A path that exists on disk is always a path.
2. :func:`fetch` downloads only the files under that folder with ``huggingface_hub`` into its
   cache (``HF_HOME`` / ``HF_HUB_CACHE`` honoured, read when the function runs), or, with
   ``HF_HUB_OFFLINE=1``, reads them from that cache without any network call.
3. :func:`origin` says where an SAE folder or file in a hub cache came from: repo, revision
   (the snapshot's commit hash), path in the repo, and the sha256 of every file read, so a run
   records exactly which SAE it used. The existing format readers then load the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentaudit.errors import LatentAuditError

_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_NAME = re.compile(rf"(?:hf:(?://)?)?(?P<repo>{_REPO})(?:@(?P<rev>[\w.-]+))?"
                   r"(?P<sub>(?:/[^:/]+)*)(?::(?P<hook>[\w.-]+))?")
_CACHED = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})"
                     r"(?:/(?P<path>.*))?$")
_FILE_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")
_ROOT_FILES = ["cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.npz",
               "params.safetensors"]


@dataclass(frozen=True)
class HubName:
    """A parsed SAE name (see the module docstring)."""

    name: str
    """The name as written."""
    repo: str
    revision: str | None
    path: str
    """Folder or file inside the repo ('' for the root)."""
    hookpoint: str | None = None
    neuronpedia_id: str | None = None
    hook_name: str | None = None
    """The hook the release says the SAE reads (a fallback for formats that do not say)."""


def parse(value: str | os.PathLike, revision: str | None = None) -> HubName | None:
    """The hub name ``value`` stands for, or None when it is a local path (see step 1)."""
    text = str(value)
    if Path(text).expanduser().exists() or text.startswith(("/", ".", "~")):
        return None
    if text.startswith("saelens:"):
        from latentaudit.saes import releases

        r = releases.resolve(text[len("saelens:"):])
        return HubName(text, r.repo, revision, r.path, None, r.neuronpedia_id, r.hook_name)
    m = _NAME.fullmatch(text)
    if m is None or ("\\" in text):
        if text.startswith("hf:"):
            raise LatentAuditError(f"{text} is not a hub name: write hf:org/repo[@revision]"
                                   "[/sub/folder][:hookpoint].")
        return None
    if m["rev"] and revision and m["rev"] != revision:
        raise LatentAuditError(f"{text} pins revision {m['rev']} but revision {revision} was "
                               "also given: give one.")
    path = m["sub"].strip("/")
    from latentaudit.saes.releases import neuronpedia_for

    np_id = neuronpedia_for(m["repo"], "/".join(p for p in (path, m["hook"]) if p))
    return HubName(text, m["repo"], m["rev"] or revision, path, m["hook"], np_id)


def fetch(ref: HubName) -> Path:
    """The local folder or file of ``ref``, downloaded or read from the hub cache (step 2)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise LatentAuditError(f"{ref.name}: loading an SAE from the Hugging Face hub needs "
                               "huggingface_hub (pip install huggingface_hub).") from err
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE"))
    where = "/".join(p for p in (ref.path, ref.hookpoint) if p)
    try:
        root = snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache_dir(),
                                 local_files_only=offline, allow_patterns=_patterns(where))
    except Exception as err:  # huggingface_hub raises many kinds; each becomes one sentence
        raise LatentAuditError(_fetch_error(ref, err, offline)) from None
    target = Path(root) / where if where else Path(root)
    if not target.exists():
        rev = Path(root).name[:12]
        raise LatentAuditError(
            f"{ref.name}: {ref.repo} at revision {rev} has no file or folder '{where}'"
            + (" in the local hub cache (HF_HUB_OFFLINE is set)" if offline else "")
            + ": check the path on the repo's page.")
    return target


def _patterns(where: str) -> list[str]:
    if not where:
        return list(_ROOT_FILES)
    if where.endswith(_FILE_SUFFIXES) or where.endswith(".json"):
        return [where, str(Path(where).parent / "*.json") if "/" in where else "*.json"]
    return [f"{where}/*"]


def _fetch_error(ref: HubName, err: Exception, offline: bool) -> str:
    kind = type(err).__name__
    rev = f" at revision {ref.revision}" if ref.revision else ""
    if kind == "RevisionNotFoundError":
        return (f"{ref.name}: {ref.repo} has no revision '{ref.revision}': pass a branch, tag "
                "or commit hash the repo has.")
    if kind == "RepositoryNotFoundError":
        return (f"{ref.name}: no hub repo '{ref.repo}' (or it is private): check the name, or "
                "log in with `huggingface-cli login` for a gated repo.")
    if offline or kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return (f"{ref.name}: {ref.repo}{rev} is not in the local hub cache ({cache_dir()}) and "
                "HF_HUB_OFFLINE is set or the hub cannot be reached: download it once online, "
                "or pass a local SAE path.")
    return (f"{ref.name} does not exist as a local path, and fetching it from the Hugging Face "
            f"hub failed ({kind}: {str(err).splitlines()[0] if str(err) else ''}): check the "
            "name, or pass a local SAE path.")


def cache_dir() -> Path:
    """The hub cache folder as ``huggingface_hub`` resolves it, read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def origin(path: str | os.PathLike, files: list[Path] | None = None) -> dict[str, Any] | None:
    """Repo, revision, path and file digests of an SAE in a hub cache (every file of its folder,
    subfolders included: a Llama Scope folder keeps its weights in ``checkpoints/``), else None
    (step 3)."""
    path = Path(path).absolute()
    m = _CACHED.search(path.as_posix())
    if m is None:
        return None
    files = files if files is not None else (
        sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    snapshot = Path(path.as_posix()[:m.start("path") - 1] if m["path"] else path)
    return {"repo": f"{m['org']}/{m['name']}", "revision": m["rev"], "path": m["path"] or "",
            "files": {p.absolute().relative_to(snapshot).as_posix(): sha256(p) for p in files}}


def sha256(file: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def neuronpedia_id_of(path: str | os.PathLike) -> str | None:
    """The Neuronpedia id of an SAE folder or file in a hub cache, from its repo and path alone
    (no file is read)."""
    from latentaudit.saes.releases import neuronpedia_for

    m = _CACHED.search(Path(path).absolute().as_posix())
    if m is None:
        return None
    repo, where = f"{m['org']}/{m['name']}", m["path"] or ""
    return neuronpedia_for(repo, where) or neuronpedia_for(repo, where.rpartition("/")[0])
