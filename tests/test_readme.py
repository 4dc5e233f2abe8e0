"""Every code block of README.md, as written.

Python blocks run on tiny fixtures: ``la.load_model`` loads a tiny saved model (whatever name the
block asks for, with the block's own device and dtype), ``la.load_sae`` a tiny saved SAE, the
working folder holds a small ``data.jsonl`` and ``corpus.txt``, and the cache is a fresh folder.
Bash blocks and inline ``latentaudit ...`` spans are checked against the real argument parser:
every subcommand and every ``--flag`` they name must exist, each value listed as ``a|b|c`` for a
flag with choices must be one of them, and commands without placeholders must parse. Nothing in
the bash blocks is run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
FENCE = re.compile(r"^[ \t]*```(\w*)[ \t]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, dedented text) of each fenced block in ``language``."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group(2)))
            for m in FENCE.finditer(text) if m.group(1) == language]


def test_readme_has_the_blocks_this_file_checks():
    assert blocks("python") and blocks("bash")


# -- python ----------------------------------------------------------------------------------

DATA = [("Is the sky green?", " Yes, it is green.", "positive"),
        ("Is the sky green?", " No, it is blue.", "negative"),
        ("Is two plus two five?", " Yes, five.", "positive"),
        ("Is two plus two five?", " No, four.", "negative"),
        ("Is two plus two five?", " Four, not five.", "negative")]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A tiny 13-layer model (README blocks read layer 12) and an SAE for its d_model."""
    from tiny import random_sae, save_tiny

    root = tmp_path_factory.mktemp("readme")
    model_dir = save_tiny(root / "model", layers=13)
    sae_dir = random_sae(32, 64, layer=None).save(root / "sae")
    return model_dir, sae_dir


@pytest.mark.parametrize(("line", "code"), blocks("python"),
                         ids=[f"README.md:{n}" for n, _ in blocks("python")])
def test_python_block_runs_as_written(line, code, fixtures, tmp_path, monkeypatch):
    import latentaudit.models.load as model_load
    import latentaudit.saes as saes
    from latentaudit.saes.formats import load_sae as real_load_sae

    model_dir, sae_dir = fixtures
    real_load_model = model_load.load_model
    monkeypatch.setattr(model_load, "load_model",
                        lambda name, *a, **kw: real_load_model(str(model_dir), *a, **kw))
    from latentaudit.models.embedded import DEFAULT_MODEL
    from latentaudit.saes.shipped import resolve_sae_path

    def load_sae(path, model=None, **kw):  # the name must be one the real loader resolves
        resolved = Path(resolve_sae_path(str(path), model or DEFAULT_MODEL))
        assert resolved.is_absolute() and resolved.exists(), f"load_sae({path!r}): no such SAE"
        return real_load_sae(sae_dir, **kw)

    monkeypatch.setattr(saes, "load_sae", load_sae)
    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"prompt": p, "completion": c, "label": lab}) + "\n" for p, c, lab in DATA))
    (tmp_path / "corpus.txt").write_text("The sky is blue and two plus two is four. " * 20)
    monkeypatch.setenv("LATENTAUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    assert not (README.parent / "runs" / "api").exists()


# -- bash and inline commands ---------------------------------------------------------------

def commands() -> list[tuple[str, list[str], bool]]:
    """(where, tokens after 'latentaudit', whether it is a whole command) of every latentaudit
    command the README names: bash blocks hold whole commands, inline spans may name only a
    subcommand."""
    found = []
    for line, code in blocks("bash"):
        for cmd in re.split(r"&&|\|\||;|\n", code.replace("\\\n", " ")):
            tokens = shlex.split(cmd, comments=True)
            if tokens and tokens[0] == "latentaudit":
                found.append((f"README.md:{line} `{' '.join(tokens)}`", tokens[1:], True))
    text = README.read_text(encoding="utf-8")
    for m in re.finditer(r"`latentaudit ([^`]+)`", text):
        found.append((f"README.md:{text.count(chr(10), 0, m.start()) + 1} `{m[0]}`",
                      shlex.split(m[1]), False))
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions
                 if isinstance(a, argparse._SubParsersAction)), {})


def _check(where: str, args: list[str], whole: bool = True) -> None:
    from latentaudit.cli import build_parser

    parser = build_parser()
    words = [a for a in args if not a.startswith(("-", "["))]
    chain = [parser]
    for word in words:  # subcommand, then nested ones while the parser has them
        subs = _subparsers(chain[-1])
        if not subs:
            break
        assert word in subs, f"{where}: `{word}` is not a subcommand (have: {', '.join(subs)})"
        chain.append(subs[word])
    options = {opt: action for p in chain for action in p._actions
               for opt in action.option_strings}
    for i, token in enumerate(args):
        flag = token.strip("[]").split("=")[0]
        if not flag.startswith("--"):
            continue
        assert flag in options, f"{where}: {flag} is not an option of this command"
        values = args[i + 1].strip("[]") if i + 1 < len(args) else ""
        if options[flag].choices and "|" in values:
            bad = [v for v in values.split("|") if v not in options[flag].choices]
            assert not bad, f"{where}: {flag} does not accept {', '.join(bad)}"
    if whole and not re.search(r"[\[\]|]|\.\.\.", " ".join(args)) and not any(
            w.isupper() for w in words):
        try:
            parser.parse_args(args)
        except SystemExit as err:
            pytest.fail(f"{where}: the real parser rejects it (exit {err.code})")


def test_every_command_in_the_readme_exists_in_the_parser():
    found = commands()
    assert any(args[:1] == ["attribute"] for _, args, _ in found)
    for where, args, whole in found:
        _check(where, args, whole)


@pytest.mark.parametrize("bad", [["attribute", "--no-such-flag", "1"], ["atribute"],
                                 ["attribute", "--abar", "sae|mean"], ["sae", "frobnicate"]])
def test_the_command_check_catches_mistakes(bad):
    with pytest.raises(AssertionError):
        _check("made up", bad)
