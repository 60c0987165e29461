"""Resumable HTTP(S) download with checksum verification and an atomic final rename.

The bytes go to ``DIR/.partial/NAME`` while they arrive. A rerun (or an automatic retry
after a dropped connection) asks the server for the rest with ``Range: bytes=N-``, N
being the size already on disk, and appends. A server that answers ``200`` instead of
``206`` ignores ranges: the partial file is discarded and the transfer starts over, since
appending a full body would corrupt it. A ``206`` whose ``Content-Range`` does not start
at N is treated the same way.

Once the byte count matches what the server announced, the file is hashed (MD5 or
SHA-256, whichever the registry publishes). On a mismatch it is moved aside to
``DIR/.partial/NAME.corrupt`` (so the next run starts afresh and the evidence is kept),
and a one-line :class:`ChecksumError` says what was expected. Only a verified (or, with
no published checksum, a complete and explicitly unverified) file is renamed to
``DIR/NAME`` with :func:`os.replace`, so ``DIR/NAME`` never holds a partial download.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from medseg.errors import DataError

__all__ = ["DownloadError", "ChecksumError", "download_file", "file_digest", "verify_file", "PARTIAL_DIR"]

PARTIAL_DIR = ".partial"
_CHUNK = 1 << 20
_USER_AGENT = "medseg-data-download/0.1"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIABLE = re.compile(r"bytes\s+\*/(\d+)")
# Errors after which asking again (with a Range request) can succeed.
_TRANSIENT = (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError, socket.timeout, TimeoutError)


class DownloadError(DataError):
    """A download failed: unreachable server, HTTP error, truncated transfer, bad checksum."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the published digest."""

    def __init__(self, message: str, algorithm: str = "", expected: str = "", actual: str = "") -> None:
        super().__init__(message)
        self.algorithm, self.expected, self.actual = algorithm, expected, actual


class _Restart(Exception):
    """Internal: discard the partial file and start from byte 0."""


class _Truncated(Exception):
    """Internal: the connection ended before the announced number of bytes arrived."""


def file_digest(path: str | Path, algorithm: str, progress: bool = False) -> str:
    """Hex digest (``"md5"`` or ``"sha256"``) of a file, read in 4 MiB blocks."""
    path = Path(path)
    h = hashlib.new(algorithm, usedforsecurity=False)  # integrity, not security: allowed under FIPS
    bar = _bar(path.stat().st_size, 0, f"{algorithm} {path.name}", progress)
    with open(path, "rb") as f, bar:
        while block := f.read(4 * _CHUNK):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def verify_file(path: str | Path, algorithm: str, expected: str, progress: bool = False) -> str:
    """Check ``path`` against ``expected`` (hex, case-insensitive); return the digest.

    Raises
    ------
    ChecksumError
        The digest differs; the message names the file and both digests.
    """
    actual = file_digest(path, algorithm, progress)
    expected = expected.strip().lower()
    if actual != expected:
        raise ChecksumError(
            f"{path}: {algorithm.upper()} mismatch (expected {expected}, got {actual})", algorithm, expected, actual
        )
    return actual


def download_file(
    url: str,
    dest: str | Path,
    *,
    checksum: tuple[str, str] | None = None,
    expected_size: int | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 2.0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming a previous partial transfer.

    Parameters
    ----------
    url : str
        ``http://`` or ``https://`` URL.
    dest : path
        Final file. The partial file is ``dest.parent/.partial/dest.name``. An existing
        ``dest`` is reused when it passes ``checksum`` (or when there is none).
    checksum : (algorithm, hexdigest) or None
        ``("md5", ...)`` or ``("sha256", ...)``; ``None`` skips verification (logged).
    expected_size : int or None
        Published size in bytes; a server announcing another size is an error.
    retries : int
        How many times a dropped or stalled connection is resumed before giving up.
    timeout : float
        Seconds without data before a connection counts as stalled.
    backoff : float
        Seconds before the first retry, doubled each time (capped at 30).
    progress : bool
        Show a tqdm progress bar (on stderr).
    log : callable or None
        Receives one-line status messages (default: print to stderr).

    Raises
    ------
    DownloadError
        Bad URL, HTTP error status, unreachable server or a transfer still incomplete
        after ``retries`` resumptions (the partial file is kept for the next run).
    ChecksumError
        Digest mismatch; the bad file has been moved to ``.partial/NAME.corrupt``.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    dest = Path(dest)
    if not re.match(r"^https?://", url):
        raise DownloadError(f"{url}: only http:// and https:// URLs can be downloaded")
    partial_dir = dest.parent / PARTIAL_DIR
    partial_dir.mkdir(parents=True, exist_ok=True)
    partial = partial_dir / dest.name

    if dest.is_file():
        if checksum is None:
            say(f"{dest}: already downloaded (no published checksum; not verified)")
            return dest
        try:
            verify_file(dest, *checksum, progress=progress)
        except ChecksumError as err:
            corrupt = _move_aside(dest, partial_dir)
            say(f"{err}; moved to {corrupt}, downloading again")
        else:
            say(f"{dest}: already downloaded, {checksum[0].upper()} ok")
            return dest

    attempt = 0
    while True:
        try:
            total = _transfer(url, partial, expected_size, timeout, progress, say)
            break
        except _Restart as why:
            say(f"{url}: {why}; restarting from byte 0")
            partial.unlink(missing_ok=True)
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"{url}: gave up after {retries} restart(s) ({why})") from None
        except _TRANSIENT + (_Truncated,) as err:
            attempt += 1
            have = partial.stat().st_size if partial.exists() else 0
            if attempt > retries:
                raise DownloadError(
                    f"{url}: transfer interrupted at {have} bytes after {retries} resumption(s) "
                    f"({_describe(err)}); run again to resume from {partial}"
                ) from None
            wait = min(backoff * 2 ** (attempt - 1), 30.0)
            say(f"{url}: interrupted at {have} bytes ({_describe(err)}); resuming in {wait:.0f} s "
                f"(retry {attempt}/{retries})")
            time.sleep(wait)

    size = partial.stat().st_size
    if total is not None and size != total:  # pragma: no cover - _transfer guarantees this
        raise DownloadError(f"{partial}: {size} bytes on disk but the server announced {total}")
    if checksum is None:
        digest = file_digest(partial, "sha256", progress)
        say(f"{dest.name}: UNVERIFIED download (no published checksum); its SHA-256 is {digest}")
    else:
        try:
            verify_file(partial, *checksum, progress=progress)
        except ChecksumError as err:
            corrupt = _move_aside(partial, partial_dir)
            raise ChecksumError(
                f"{url}: {err.algorithm.upper()} mismatch (expected {err.expected}, got {err.actual}); "
                f"the file was moved to {corrupt}",
                err.algorithm, err.expected, err.actual,
            ) from None
        say(f"{dest.name}: {checksum[0].upper()} ok")
    os.replace(partial, dest)
    return dest


def _describe(err: BaseException) -> str:
    if isinstance(err, _Truncated):
        return str(err)
    if isinstance(err, http.client.IncompleteRead):
        return "connection closed early"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _move_aside(path: Path, partial_dir: Path) -> Path:
    corrupt = partial_dir / f"{path.name}.corrupt"
    os.replace(path, corrupt)
    return corrupt


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start > 0:
            return err  # handled by the caller: maybe the partial file is already complete
        if 500 <= err.code < 600:
            raise ConnectionError(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, (ConnectionError, socket.timeout, TimeoutError)):
            raise reason from None
        raise DownloadError(f"{url}: cannot connect ({reason})") from None


def _transfer(
    url: str, partial: Path, expected_size: int | None, timeout: float, progress: bool, say: Callable[[str], None]
) -> int | None:
    """One connection: append to ``partial`` until EOF; return the announced total size."""
    start = partial.stat().st_size if partial.exists() else 0
    response = _open(url, start, timeout)
    with response:
        status = response.status if hasattr(response, "status") else response.code
        if status == 416:
            match = _UNSATISFIABLE.match(response.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == start:
                return start  # already complete
            raise _Restart(f"server refused the range bytes={start}-")
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != start:
                raise _Restart(f"server answered bytes {response.headers.get('Content-Range')!r} to bytes={start}-")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
            if start:
                say(f"{partial.name}: resuming at {start} bytes")
        else:
            if start:
                say(f"{partial.name}: server ignored the Range request; downloading from the start")
            start = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{url}: server announces {total} bytes but {expected_size} are expected")
        received = start
        with open(partial, mode) as out, _bar(total, start, partial.name, progress) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:
        raise _Truncated(f"connection closed after {received} of {total} bytes")
    if total is not None and received > total:
        raise _Restart(f"received {received} bytes, more than the {total} announced")
    return total


def _bar(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        # A bar redrawn into a log file is noise: draw it on terminals only.
        disable=not enabled or not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True, leave=False,
    )
