"""Public SAE releases by their SAELens names, and their Neuronpedia pages.

1. ``saelens:RELEASE/ID`` is resolved through SAELens's pretrained registry when ``sae-lens`` is
   installed (``pip install 'latentaudit[saelens]'``), else through :data:`RELEASES`, a small
   table of the most used releases kept here. Either gives a :class:`Resolved`: the hub repo,
   the path inside it, the hook name and the Neuronpedia id (``MODEL/SAE``) when known.
2. :func:`neuronpedia_for` maps a hub repo and path back to the release it belongs to, so an SAE
   named by its repo and subfolder gets the same Neuronpedia id as one named by its SAELens id.
3. :func:`neuronpedia_url` is a latent's page: ``https://www.neuronpedia.org/MODEL/SAE/INDEX``;
   :func:`neuronpedia_list` is a list of latents as a Neuronpedia quick list (``modelId``,
   ``layer`` = the SAE id, ``index``; opened at ``/quick-list/?name=..&features=..``). No
   network is used.

Each table row gives an id pattern with named groups (``layer``, ``width``, ...); the path in
the repo, the hook name and the Neuronpedia id are templates over those groups.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from latentaudit.errors import LatentAuditError

NEURONPEDIA = "https://www.neuronpedia.org"
EXTRA = "saelens"


@dataclass(frozen=True)
class Release:
    """One row of :data:`RELEASES` (see the module docstring)."""

    repo: str
    model: str
    """The model's Hugging Face name."""
    id_pattern: str
    path: str = "{id}"
    hook: str = "blocks.{layer}.hook_resid_post"
    neuronpedia: str | None = None
    id_format: str | None = None
    """The id from the path's fields, where ``path`` does not contain ``{id}``."""


@dataclass(frozen=True)
class Resolved:
    """Where one public SAE lives and what it is called elsewhere."""

    release: str
    sae_id: str
    repo: str
    path: str
    model: str | None
    hook_name: str | None
    neuronpedia_id: str | None


_GS1 = r"layer_(?P<layer>\d+)/width_(?P<width>\w+)/canonical"
_GS1_L0 = r"layer_(?P<layer>\d+)/width_(?P<width>\w+)/average_l0_\d+"
_GS2 = r"layer_(?P<layer>\d+)_width_(?P<width>\w+)_l0_(?:small|medium|big)"


def _gemma_scope_2(size: str, tuned: str) -> dict[str, Release]:
    model = f"google/gemma-3-{size}-{tuned}"
    return {f"gemma-scope-2-{size}-{tuned}-res{tail}": Release(
        f"google/gemma-scope-2-{size}-{tuned}", model, _GS2, f"{folder}/{{id}}")
        for tail, folder in (("", "resid_post"), ("-all", "resid_post_all"))}


RELEASES: dict[str, Release] = {
    # Gemma Scope (Gemma 2), residual stream, JumpReLU, params.npz per folder.
    "gemma-scope-2b-pt-res-canonical": Release(
        "google/gemma-scope-2b-pt-res", "google/gemma-2-2b", _GS1,
        neuronpedia="gemma-2-2b/{layer}-gemmascope-res-{width}"),
    "gemma-scope-2b-pt-res": Release("google/gemma-scope-2b-pt-res", "google/gemma-2-2b", _GS1_L0),
    "gemma-scope-9b-pt-res-canonical": Release(
        "google/gemma-scope-9b-pt-res", "google/gemma-2-9b", _GS1,
        neuronpedia="gemma-2-9b/{layer}-gemmascope-res-{width}"),
    "gemma-scope-9b-pt-res": Release("google/gemma-scope-9b-pt-res", "google/gemma-2-9b", _GS1_L0),
    "gemma-scope-9b-it-res-canonical": Release(
        "google/gemma-scope-9b-it-res", "google/gemma-2-9b-it", _GS1,
        neuronpedia="gemma-2-9b-it/{layer}-gemmascope-res-{width}"),
    "gemma-scope-27b-pt-res": Release("google/gemma-scope-27b-pt-res", "google/gemma-2-27b",
                                      _GS1_L0),
    # Gemma Scope 2 (Gemma 3), residual stream: resid_post/ (some layers), resid_post_all/.
    **{k: v for size in ("270m", "1b", "4b", "12b", "27b") for tuned in ("pt", "it")
       for k, v in _gemma_scope_2(size, tuned).items()},
    # OpenAI's GPT-2 small autoencoders (v5), as SAELens republishes them.
    "gpt2-small-resid-post-v5-32k": Release(
        "jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs", "openai-community/gpt2",
        r"blocks\.(?P<layer>\d+)\.hook_resid_post", "v5_32k_layer_{layer}.pt",
        neuronpedia="gpt2-small/{layer}-res_post_32k-oai",
        id_format="blocks.{layer}.hook_resid_post"),
    "gpt2-small-resid-post-v5-128k": Release(
        "jbloom/GPT2-Small-OAI-v5-128k-resid-post-SAEs", "openai-community/gpt2",
        r"blocks\.(?P<layer>\d+)\.hook_resid_post", "v5_128k_layer_{layer}",
        neuronpedia="gpt2-small/{layer}-res_post_128k-oai",
        id_format="blocks.{layer}.hook_resid_post"),
    "gpt2-small-res-jb": Release(
        "jbloom/GPT2-Small-SAEs-Reformatted", "openai-community/gpt2",
        r"blocks\.(?P<layer>\d+)\.hook_(?P<point>resid_pre|resid_post)",
        hook="blocks.{layer}.hook_{point}", neuronpedia="gpt2-small/{layer}-res-jb"),
    # EleutherAI's sparsify releases: one folder per hookpoint.
    "sae-llama-3-8b-32x": Release(
        "EleutherAI/sae-llama-3-8b-32x", "meta-llama/Meta-Llama-3-8B",
        r"layers\.(?P<layer>\d+)", hook="layers.{layer}"),
    "sae-llama-3-8b-32x-v2": Release(
        "EleutherAI/sae-llama-3-8b-32x-v2", "meta-llama/Meta-Llama-3-8B",
        r"layers\.(?P<layer>\d+)", hook="layers.{layer}"),
    "sae-llama-3.1-8b-32x": Release(
        "EleutherAI/sae-llama-3.1-8b-32x", "meta-llama/Llama-3.1-8B",
        r"layers\.(?P<layer>\d+)", hook="layers.{layer}"),
}
"""Releases latentaudit resolves without ``sae-lens``; the keys are SAELens release names
where SAELens has the release."""


def resolve(name: str) -> Resolved:
    """``RELEASE/ID`` (the part after ``saelens:``) as a :class:`Resolved`, or one clear error."""
    release, sep, sae_id = name.partition("/")
    if not sep or not release or not sae_id:
        raise LatentAuditError(f"saelens:{name} is not a SAELens name: write "
                               "saelens:RELEASE/ID, e.g. saelens:gemma-scope-2b-pt-res-canonical/"
                               "layer_20/width_16k/canonical.")
    registry = _saelens_registry()
    if registry is not None and release in registry:
        return _from_registry(release, sae_id, registry[release])
    if release in RELEASES:
        return _from_table(release, sae_id, RELEASES[release])
    hint = ("it is not in the installed SAELens registry either" if registry is not None else
            f"install the '{EXTRA}' extra (pip install 'latentaudit[{EXTRA}]') to resolve every "
            "SAELens release")
    raise LatentAuditError(
        f"saelens:{name}: release '{release}' is not one latentaudit knows "
        f"({', '.join(sorted(RELEASES))}); {hint}, or name the SAE by its hub repo and folder.")


def _from_table(release: str, sae_id: str, row: Release) -> Resolved:
    m = re.fullmatch(row.id_pattern, sae_id)
    if m is None:
        raise LatentAuditError(
            f"saelens:{release}/{sae_id}: '{sae_id}' is not an id of {release} (ids look like "
            f"{row.id_pattern}); check the id on the release's hub page ({row.repo}).")
    fields = {"id": sae_id, **m.groupdict()}
    np_id = row.neuronpedia.format(**fields) if row.neuronpedia else None
    return Resolved(release, sae_id, row.repo, row.path.format(**fields), row.model,
                    row.hook.format(**fields), np_id)


def _from_registry(release: str, sae_id: str, entry: Any) -> Resolved:
    saes = dict(getattr(entry, "saes_map", None) or {})
    if sae_id not in saes:
        some = ", ".join(list(saes)[:5])
        raise LatentAuditError(f"saelens:{release}/{sae_id}: the SAELens registry has no id "
                               f"'{sae_id}' in {release} (ids: {some}, ...).")
    np_ids = getattr(entry, "neuronpedia_id", None) or {}
    row = RELEASES.get(release)
    hook = None
    if row is not None and (m := re.fullmatch(row.id_pattern, sae_id)):
        hook = row.hook.format(id=sae_id, **m.groupdict())
    return Resolved(release, sae_id, entry.repo_id, saes[sae_id], getattr(entry, "model", None),
                    hook, np_ids.get(sae_id))


def _saelens_registry() -> dict[str, Any] | None:
    """SAELens's release registry, or None when sae-lens is not installed."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        try:
            from sae_lens.toolkit.pretrained_saes_directory import get_pretrained_saes_directory
        except ImportError:
            return None
    return get_pretrained_saes_directory()


def neuronpedia_for(repo: str, path: str) -> str | None:
    """The Neuronpedia id of the SAE at ``path`` in hub ``repo``, if a known release has one."""
    path = path.strip("/")
    for name, row in RELEASES.items():
        if row.repo != repo or row.neuronpedia is None:
            continue
        for sae_id in _ids_for_path(row, path):
            return _from_table(name, sae_id, row).neuronpedia_id
    return None


def _ids_for_path(row: Release, path: str) -> list[str]:
    """The ids of ``row`` whose path in the repo is ``path`` (the path template inverted)."""
    regex = "".join(
        f"(?P<{p[1:-1]}>{'.+' if p == '{id}' else '[^/]+'})" if p.startswith("{")
        else re.escape(p) for p in re.split(r"(\{\w+\})", row.path))
    m = re.fullmatch(regex, path)
    if m is None:
        return []
    fields = m.groupdict()
    sae_id = fields["id"] if "id" in fields else (
        row.id_format.format(**fields) if row.id_format else None)
    return [sae_id] if sae_id is not None and re.fullmatch(row.id_pattern, sae_id) else []


def neuronpedia_url(neuronpedia_id: str, index: int) -> str:
    """A latent's Neuronpedia page (``MODEL/SAE`` id and latent index)."""
    return f"{NEURONPEDIA}/{neuronpedia_id}/{int(index)}"


def split_url(url: str) -> tuple[str, int]:
    """(Neuronpedia id, index) of a page URL made by :func:`neuronpedia_url`."""
    np_id, _, index = url.removeprefix(NEURONPEDIA + "/").rpartition("/")
    return np_id, int(index)


def neuronpedia_list(name: str, latents: list[tuple[str, int, str]]) -> dict[str, Any]:
    """``(neuronpedia_id, index, description)`` triples as a Neuronpedia list: ``features`` in
    the shape Neuronpedia's quick lists read, and ``url``, the quick list to open in a browser."""
    features = [{"modelId": np_id.partition("/")[0], "layer": np_id.partition("/")[2],
                 "index": str(int(i)), "description": d} for np_id, i, d in latents]
    link = [{k: f[k] for k in ("modelId", "layer", "index")} for f in features]
    url = (f"{NEURONPEDIA}/quick-list/?name={quote(name)}"
           f"&features={quote(json.dumps(link, separators=(',', ':')))}")
    return {"name": name, "features": features, "url": url}
