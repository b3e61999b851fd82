"""Download model weights safely: pinned sha256, resume of partial downloads, progress, atomic rename.

Plain Python (``urllib``): no Slicer, no Qt, no torch, so it runs and is tested anywhere. The Slicer
module calls it from a worker thread and shows the progress callback in a progress bar.

What a download guarantees:

* The file appears at its final path only complete and verified: bytes go to ``<name>.part``, the
  sha256 is computed while they arrive, and the part file is renamed over the destination
  (``os.replace``, atomic on one file system) only when the digest matches the pinned one.
* An interrupted download (network error, timeout, cancel) keeps ``<name>.part``; the next call asks
  the server for the rest (HTTP ``Range: bytes=N-``) and continues hashing where it stopped. A server
  that ignores the range (answers 200) or answers from another offset is handled by starting over.
* A checksum mismatch removes the part file (it can never become valid by resuming) and raises
  :class:`ChecksumMismatchError` naming the URL, both digests and what to do.
* Only ``https`` URLs are fetched, except plain ``http`` to the loopback interface (used by tests).
* A source without a pinned sha256 is refused: nothing unverified is ever written as weights.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import logging
import os
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Union

logger = logging.getLogger(__name__)

#: ``progress(bytes_done, bytes_total)``; ``bytes_total`` is None when the server does not say.
ProgressCallback = Callable[[int, Optional[int]], None]

USER_AGENT = "FastSAM3D-Slicer/0.1 (+urllib)"
PART_SUFFIX = ".part"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(RuntimeError):
    """A download that did not produce a verified file (the message says why and what to do)."""


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes do not have the pinned sha256; the partial file has been removed."""


class DownloadCancelled(DownloadError):
    """The caller cancelled; the partial file is kept so that the next attempt resumes."""


@dataclass(frozen=True)
class WeightsSource:
    """A downloadable checkpoint and the facts needed to trust it.

    Attributes:
      key: short identifier used in settings and on the command line.
      title: what the user sees.
      url: where the file is published (https).
      filename: the name it is stored under.
      sha256: the pinned hex digest of the published file; None means "not pinned yet" and the
        download is refused.
      size: the published size in bytes, if known (used only for progress before the server answers).
      license: the weights' license.
      homepage: where the weights are described.
    """

    key: str
    title: str
    url: str
    filename: str
    sha256: Optional[str]
    size: Optional[int]
    license: str
    homepage: str


#: Public weights the module offers to download.
#:
#: * ``sam-med3d-turbo``: the SAM-Med3D ViT-B teacher (Wang et al.), ``sam_med3d_turbo.pth`` as
#:   published on Hugging Face (commit 07f6f69, "Update SAM-Med3D ckpt with new Torch Version"); its
#:   sha256 is the one Hugging Face shows for that file's LFS object. A pure state dict, loaded by
#:   ``load_model`` (about 10x slower to embed than the FastSAM3D student, same decoder).
#: * ``fastsam3d``: the FastSAM3D student (about 638 MB: model weights plus optimizer state and an
#:   ``argparse.Namespace``, so it is converted once to safetensors after verification). Its
#:   sha256 is not pinned yet: no published digest was found, and it must be taken from the file's
#:   LFS pointer by a maintainer with network access. Until then its download is refused with that
#:   explanation, and :data:`DEFAULT_PUBLIC_WEIGHTS` is the pinned teacher.
PUBLIC_WEIGHTS: Dict[str, WeightsSource] = {
    "sam-med3d-turbo": WeightsSource(
        key="sam-med3d-turbo",
        title="SAM-Med3D-turbo (public ViT-B weights, Wang et al.)",
        url="https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth",
        filename="sam_med3d_turbo.pth",
        sha256="899a46d04d3b70f723282ceb489149373558bf0aaba389a346f5ab57da5cdd3c",
        size=None,
        license="Apache-2.0",
        homepage="https://huggingface.co/blueyo0/SAM-Med3D",
    ),
    "fastsam3d": WeightsSource(
        key="fastsam3d",
        title="FastSAM3D (public student weights, Shen et al., MICCAI 2024)",
        url="https://huggingface.co/techlove/FastSAM3D/resolve/main/FastSAM3D.pth",
        filename="FastSAM3D.pth",
        sha256=None,
        size=None,
        license="Apache-2.0",
        homepage="https://huggingface.co/techlove/FastSAM3D",
    ),
}

#: What the module's "Download public weights" button fetches: the first source with a pinned sha256.
DEFAULT_PUBLIC_WEIGHTS: str = next(key for key, source in PUBLIC_WEIGHTS.items() if source.sha256)


def sha256_of_file(path: Union[str, os.PathLike], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_url(url: str) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "https":
        return
    if parsed.scheme == "http":
        host = (parsed.hostname or "").strip("[]")
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
    raise DownloadError(f"{url}: only https URLs are downloaded (plain http only from the loopback interface)")


def _check_sha256(sha256: Optional[str], url: str) -> str:
    if sha256 is None or sha256 == "":
        raise DownloadError(
            f"{url}: no sha256 is pinned for this file, so its integrity could not be verified and it is not "
            "downloaded. Download it yourself from its homepage and choose it as a local checkpoint, or pin its "
            "published sha256 in FastSAM3DDownload.PUBLIC_WEIGHTS."
        )
    digest = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(digest):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return digest


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _hash_existing(part: Path, digest, chunk_size: int) -> int:
    """Feed an existing part file into ``digest``; return its size."""
    size = 0
    with open(part, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
            size += len(chunk)
    return size


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _finish(part: Path, destination: Path, digest_hex: str, expected: str, url: str) -> Path:
    if digest_hex != expected:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"{url}: the downloaded file's sha256 is {digest_hex}, expected {expected}. The file is corrupt, "
            "truncated or not the published one; the partial download was removed. Try again later, or "
            "download it yourself and choose it as a local checkpoint."
        )
    os.replace(part, destination)
    logger.info("downloaded %s to %s (sha256 %s)", url, destination, digest_hex)
    return destination


def download_file(
    url: str,
    destination: Union[str, os.PathLike],
    sha256: Optional[str],
    *,
    progress: Optional[ProgressCallback] = None,
    cancel=None,
    timeout: float = 30.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``destination``, verified against the pinned ``sha256``.

    Arguments:
      url: https URL (or http on the loopback interface).
      destination: final path; its folder is created. An existing file with the right digest is
        kept and returned without any network access.
      sha256: pinned hex digest of the file (required).
      progress: called as ``progress(bytes_done, bytes_total_or_None)`` after every chunk.
      cancel: a ``threading.Event`` or a callable returning True to stop (the part file is kept).
      timeout: seconds to wait for the connection and for each read.
      chunk_size: bytes per read.

    Returns:
      the destination path.

    Raises:
      DownloadError: refused source, network failure or incomplete transfer (the partial file is
        kept for resuming); ChecksumMismatchError (partial file removed); DownloadCancelled.
    """
    expected = _check_sha256(sha256, url)
    _check_url(url)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists() and sha256_of_file(destination) == expected:
        size = destination.stat().st_size
        if progress is not None:
            progress(size, size)
        return destination

    part = destination.with_name(destination.name + PART_SUFFIX)
    for attempt in range(2):  # a second attempt only when the server cannot resume and we start over
        digest = hashlib.sha256()
        offset = _hash_existing(part, digest, chunk_size) if part.exists() else 0
        try:
            response = _open(url, offset, timeout)
        except urllib.error.HTTPError as error:
            if error.code == 416 and offset > 0:
                # Range not satisfiable: the part file may already hold the whole file.
                return _finish(part, destination, digest.hexdigest(), expected, url)
            raise DownloadError(f"{url}: the server answered HTTP {error.code} {error.reason}") from error
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise DownloadError(f"{url}: could not connect ({error}); check the network and try again") from error

        with response:
            status = getattr(response, "status", 200)
            total: Optional[int] = None
            if offset > 0 and status == 206:
                match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
                if not match or int(match.group(1)) != offset:
                    logger.warning("%s: server resumed from an unexpected offset; starting over", url)
                    part.unlink(missing_ok=True)
                    continue
                total = int(match.group(3)) if match.group(3) != "*" else None
                mode = "ab"
            else:
                if offset > 0:
                    logger.info("%s: server does not support resuming (HTTP %s); starting over", url, status)
                    digest = hashlib.sha256()
                    offset = 0
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None and length.isdigit() else None
                mode = "wb"

            done = offset
            if progress is not None:
                progress(done, total)
            try:
                with open(part, mode) as handle:
                    while True:
                        if _is_cancelled(cancel):
                            raise DownloadCancelled(
                                f"{url}: download cancelled after {done} bytes; the partial file {part} is kept "
                                "and the next attempt resumes from there"
                            )
                        chunk = response.read(chunk_size)
                        if not chunk:
                            break
                        handle.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                    handle.flush()
                    os.fsync(handle.fileno())
            except DownloadCancelled:
                raise
            except (OSError, http.client.HTTPException, socket.timeout, urllib.error.URLError) as error:
                raise DownloadError(
                    f"{url}: download interrupted after {done} of {total if total is not None else '?'} bytes "
                    f"({error}); the partial file {part} is kept and the next attempt resumes from there"
                ) from error
            if total is not None and done != total:
                raise DownloadError(
                    f"{url}: the server sent {done} of {total} bytes; the partial file {part} is kept and the next "
                    "attempt resumes from there"
                )
            return _finish(part, destination, digest.hexdigest(), expected, url)
    raise DownloadError(f"{url}: the server could not resume the download; delete {part} and try again")


def download_weights(
    source: Union[str, WeightsSource],
    directory: Union[str, os.PathLike],
    *,
    progress: Optional[ProgressCallback] = None,
    cancel=None,
    timeout: float = 30.0,
) -> Path:
    """Download one of :data:`PUBLIC_WEIGHTS` (by key) or any :class:`WeightsSource` into ``directory``."""
    if isinstance(source, str):
        if source not in PUBLIC_WEIGHTS:
            raise ValueError(f"unknown weights {source!r}: expected one of {', '.join(PUBLIC_WEIGHTS)}")
        source = PUBLIC_WEIGHTS[source]
    return download_file(
        source.url,
        Path(directory) / source.filename,
        source.sha256,
        progress=progress,
        cancel=cancel,
        timeout=timeout,
    )
