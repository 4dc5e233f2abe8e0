"""``latentaudit data``: fetch the reference text corpus and show what is cached.

``data fetch`` downloads the pinned npm tarballs, verifies their sha512 integrity and cleans them
into ``<cache>/corpus/<source>.jsonl``; ``data info`` lists the cached sources with their counts
(and, with ``--examples N``, the first documents of each). The ``nlp-corpus`` source contains
offensive language: both commands say so next to it.
"""

from __future__ import annotations

import argparse
import textwrap

NAME = "data"
HELP = "Fetch the reference text corpus (for SAE training and top-activating examples)."
DESCRIPTION = (
    "Fetch and inspect the reference text corpus: the Brown corpus, State of the Union addresses "
    "and nlp-corpus (informal web text that contains offensive language), the default training "
    "mix; and gutenberg (public-domain books kept outside that mix, on which SAEs are "
    "evaluated), cached as JSONL in $LATENTAUDIT_CACHE/corpus (default "
    "~/.cache/latentaudit/corpus).")
# mirrors corpus.SOURCES without importing it
SOURCE_NAMES = ("brown", "sotu", "nlp-corpus", "gutenberg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fmt = argparse.HelpFormatter  # defaults are spelled out in the help texts
    fetch = sub.add_parser("fetch", help="Download, verify and clean the corpus sources.",
                           formatter_class=fmt)
    fetch.add_argument("--sources", nargs="+", choices=SOURCE_NAMES, default=None,
                       metavar="SOURCE",
                       help=f"Sources to fetch, among {', '.join(SOURCE_NAMES)} (default: all).")
    fetch.add_argument("--force", action="store_true",
                       help="Clean again even if the source is already cached.")
    info = sub.add_parser("info", help="Show which corpus sources are cached, with counts.",
                          formatter_class=fmt)
    info.add_argument("--examples", type=int, default=0, metavar="N",
                      help="Also print the first N documents of each cached source (default: 0).")
    for p in (fetch, info):
        p.add_argument("--cache-dir", default=None,
                       help="Cache root (default: $LATENTAUDIT_CACHE or ~/.cache/latentaudit); "
                            "the corpus lives in its corpus/ folder.")


def _summary(name: str, entry: dict) -> str:
    return (f"  {name:<11} {entry['package']}@{entry['version']}: {entry['documents']:,} "
            f"documents, {entry['words']:,} words, ~{entry['approx_tokens']:,} tokens")


def _print_warning(entry: dict, indent: int = 14) -> None:
    if entry.get("content_warning"):
        print(f"{'':<{indent}}CONTENT WARNING: {entry['content_warning']}")


def _fetch(args: argparse.Namespace) -> int:
    from latentaudit.data.corpus import fetch_corpus, read_manifest

    directory = fetch_corpus(args.cache_dir, args.sources, force=args.force)
    manifest = read_manifest(directory)
    print(f"corpus cached in {directory}")
    for name in args.sources or SOURCE_NAMES:
        entry = manifest["sources"][name]
        print(_summary(name, entry))
        _print_warning(entry)
    return 0


def _info(args: argparse.Namespace) -> int:
    from latentaudit.data.corpus import corpus_dir, load_corpus, read_manifest

    directory = corpus_dir(args.cache_dir)
    cached = read_manifest(directory)["sources"]
    print(f"corpus folder: {directory}")
    if not cached:
        print("  nothing cached yet; run `latentaudit data fetch`.")
        return 0
    for name, entry in cached.items():
        present = (directory / entry["file"]).is_file()
        print(_summary(name, entry) + ("" if present else f"  (MISSING {entry['file']})"))
        _print_warning(entry)
    total_words = sum(e["words"] for e in cached.values())
    total_tokens = sum(e["approx_tokens"] for e in cached.values())
    print(f"  total: {total_words:,} words, ~{total_tokens:,} tokens")
    for name, entry in cached.items():
        if args.examples <= 0 or not (directory / entry["file"]).is_file():
            continue
        print(f"\nfirst {args.examples} documents of {name}:")
        _print_warning(entry, indent=2)
        docs = load_corpus([name], cache_dir=args.cache_dir, interleave=False)
        for _, doc in zip(range(args.examples), docs, strict=False):
            short = textwrap.shorten(doc.text, width=300, placeholder=" ...")
            print(f"  [{doc.doc_id}] {short}")
    return 0


def run(args: argparse.Namespace) -> int:
    return _fetch(args) if args.data_command == "fetch" else _info(args)
