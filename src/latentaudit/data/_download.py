"""Resumable HTTPS download of a pinned file, checked against a Subresource-Integrity hash.

1. Bytes go to ``<dest>.part``. When it already holds N bytes (a cut download) the request asks
   for ``Range: bytes=N-``; a ``206`` whose ``Content-Range`` starts at N is appended, anything
   else (a server that ignores Range) restarts the file from byte 0. A ``416`` means the part is
   already complete. A connection cut short raises and keeps the part, so the next attempt or the
   next run resumes; ``attempts`` tries are made in one call.
2. The finished part must match the pinned ``sha512-<base64(SHA-512(file))>`` (the npm registry's
   ``dist.integrity``); otherwise it is deleted and an error raised, never used.
3. The verified part is renamed over ``dest`` (atomic).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from latentaudit._progress import progress
from latentaudit.errors import LatentAuditError

log = logging.getLogger(__name__)


def sri_sha512(path: str | os.PathLike) -> str:
    """Subresource-Integrity string ``sha512-<base64 digest>`` of a file."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return "sha512-" + base64.b64encode(h.digest()).decode("ascii")


def verify_integrity(path: Path, integrity: str, url: str = "") -> None:
    """Raise (after deleting ``path``) unless the file matches the pinned integrity string."""
    actual = sri_sha512(path)
    if actual != integrity:
        path.unlink(missing_ok=True)
        raise LatentAuditError(
            f"{path.name} failed its integrity check (expected {integrity[:22]}..., got "
            f"{actual[:22]}...) and was deleted; run the command again, and if it fails again "
            f"the server {url or ''} is not serving the pinned file.")


class CutDownload(OSError):
    """The server closed the connection before sending the whole file."""


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "latentaudit", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # the part already holds every byte: let the hash decide
            return None
        raise LatentAuditError(f"{url} answered HTTP {err.code} ({err.reason}); check the "
                               f"address and the network.") from None


def _download_part(url: str, part: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` from its current size (restart if not honoured)."""
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, offset, timeout)
    if response is None:
        return
    with response:
        content_range = response.headers.get("Content-Range", "")
        if offset and not (response.status == 206 and content_range.startswith(f"bytes {offset}-")):
            log.info("%s does not honour HTTP Range; restarting the download", url)
            offset = 0
        length = int(response.headers.get("Content-Length") or 0) or None
        total = offset + length if length else None
        bar = progress(total=total, desc=f"download {part.name.removesuffix('.part')}", unit="B")
        bar.unit_scale, bar.unit_divisor = True, 1024  # kB/MB rather than raw byte counts
        with bar, open(part, "ab" if offset else "wb") as out:
            bar.update(offset)
            received = 0
            while block := response.read(1 << 16):
                out.write(block)
                received += len(block)
                bar.update(len(block))
        if length is not None and received < length:
            raise CutDownload(f"connection closed after {offset + received} of {total} bytes")


def download(url: str, dest: Path, integrity: str, *, attempts: int = 3,
             timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming cuts; verify; return ``dest``.

    A ``dest`` already present is re-verified and downloaded again if it fails.
    """
    if dest.exists():
        if sri_sha512(dest) == integrity:
            return dest
        log.warning("%s fails its integrity check; downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _download_part(url, part, timeout)
            break
        except (OSError, http.client.HTTPException) as err:
            kept = part.stat().st_size if part.exists() else 0
            if attempt == attempts:
                raise LatentAuditError(
                    f"downloading {url} failed ({err}); run the command again to resume from "
                    f"the {kept} bytes kept in {part}.") from None
            log.warning("download of %s interrupted (%s); resuming from byte %d", url, err, kept)
    verify_integrity(part, integrity, url)
    os.replace(part, dest)
    return dest
