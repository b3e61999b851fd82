"""The weights downloader (``FastSAM3D/FastSAM3DDownload.py``) against a real HTTP server on 127.0.0.1.

Nothing here is mocked: a ``ThreadingHTTPServer`` bound to the loopback interface serves a generated
file with real ``Range`` support, a transfer that is cut off mid-way, a server that ignores ranges,
and wrong bytes. Every socket has a timeout, so a hang fails fast instead of blocking the suite.
"""

from __future__ import annotations

import hashlib
import re
import http.server
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "FastSAM3D"))

import FastSAM3DDownload as dl  # noqa: E402

PAYLOAD = bytes((i * 7919 + (i >> 9)) % 251 for i in range(300_000))
SHA = hashlib.sha256(PAYLOAD).hexdigest()
CUT_AT = 100_000


class _Handler(http.server.BaseHTTPRequestHandler):
    """/file: Range-aware; /cut: first answer stops after CUT_AT bytes; /norange: ignores Range; /wrong: other bytes."""

    protocol_version = "HTTP/1.1"
    cut_served = False
    requests: list = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, body: bytes, *, allow_range: bool = True, cut: int | None = None):
        start = 0
        header = self.headers.get("Range")
        type(self).requests.append((self.path, header))
        if allow_range and header:
            start = int(header.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if cut is not None:
            self.wfile.write(chunk[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(chunk)

    def do_GET(self):
        if self.path == "/file":
            self._send(PAYLOAD)
        elif self.path == "/cut":
            if not type(self).cut_served:
                type(self).cut_served = True
                self._send(PAYLOAD, cut=CUT_AT)
            else:
                self._send(PAYLOAD)
        elif self.path == "/norange":
            self._send(PAYLOAD, allow_range=False)
        elif self.path == "/wrong":
            self._send(PAYLOAD[::-1])
        else:
            self.send_error(404)


@pytest.fixture()
def server():
    _Handler.cut_served = False
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.mark.timeout(30)
def test_download_verifies_and_reports_progress(server, tmp_path):
    seen = []
    out = dl.download_file(f"{server}/file", tmp_path / "w.bin", SHA, progress=lambda d, t: seen.append((d, t)),
                           timeout=5, chunk_size=32_768)
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "w.bin.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # A second call finds the verified file and does not touch the network.
    before = len(_Handler.requests)
    dl.download_file(f"{server}/file", out, SHA, timeout=5)
    assert len(_Handler.requests) == before


@pytest.mark.timeout(30)
def test_cut_off_download_keeps_part_and_resumes_with_range(server, tmp_path):
    target = tmp_path / "w.bin"
    with pytest.raises(dl.DownloadError, match="resumes"):
        dl.download_file(f"{server}/cut", target, SHA, timeout=5, chunk_size=8192)
    part = tmp_path / "w.bin.part"
    assert not target.exists()
    assert part.exists() and 0 < part.stat().st_size <= CUT_AT
    kept = part.stat().st_size
    out = dl.download_file(f"{server}/cut", target, SHA, timeout=5, chunk_size=8192)
    assert out.read_bytes() == PAYLOAD and not part.exists()
    assert _Handler.requests[-1] == ("/cut", f"bytes={kept}-")


@pytest.mark.timeout(30)
def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    part = tmp_path / "w.bin.part"
    part.write_bytes(PAYLOAD[:5000])
    out = dl.download_file(f"{server}/norange", tmp_path / "w.bin", SHA, timeout=5)
    assert out.read_bytes() == PAYLOAD


@pytest.mark.timeout(30)
def test_complete_part_file_is_finished_on_416(server, tmp_path):
    (tmp_path / "w.bin.part").write_bytes(PAYLOAD)
    out = dl.download_file(f"{server}/file", tmp_path / "w.bin", SHA, timeout=5)
    assert out.read_bytes() == PAYLOAD
    assert _Handler.requests[-1] == ("/file", f"bytes={len(PAYLOAD)}-")


@pytest.mark.timeout(30)
def test_checksum_mismatch_removes_part_and_keeps_existing_file(server, tmp_path):
    target = tmp_path / "w.bin"
    target.write_bytes(b"the user's previous file")
    with pytest.raises(dl.ChecksumMismatchError, match=SHA):
        dl.download_file(f"{server}/wrong", target, SHA, timeout=5)
    assert not (tmp_path / "w.bin.part").exists()
    assert target.read_bytes() == b"the user's previous file"


@pytest.mark.timeout(30)
def test_cancel_keeps_part_for_resume(server, tmp_path):
    stop = threading.Event()

    def progress(done, total):
        if done >= 50_000:
            stop.set()

    with pytest.raises(dl.DownloadCancelled):
        dl.download_file(f"{server}/file", tmp_path / "w.bin", SHA, progress=progress, cancel=stop, timeout=5,
                         chunk_size=16_384)
    assert (tmp_path / "w.bin.part").stat().st_size >= 50_000
    out = dl.download_file(f"{server}/file", tmp_path / "w.bin", SHA, timeout=5)
    assert out.read_bytes() == PAYLOAD


def test_refuses_unpinned_insecure_and_malformed(tmp_path):
    with pytest.raises(dl.DownloadError, match="no sha256 is pinned"):
        dl.download_file("https://example.org/w.bin", tmp_path / "w.bin", None)
    with pytest.raises(dl.DownloadError, match="only https"):
        dl.download_file("http://example.org/w.bin", tmp_path / "w.bin", SHA)
    with pytest.raises(ValueError, match="64 hexadecimal"):
        dl.download_file("https://example.org/w.bin", tmp_path / "w.bin", "abc")
    # The public entry has no pinned digest yet: refused with an explanation, nothing written.
    with pytest.raises(dl.DownloadError, match="no sha256 is pinned"):
        dl.download_weights("fastsam3d", tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(30)
def test_unreachable_server_is_a_clear_error(tmp_path):
    with socket_closed_port() as port:
        with pytest.raises(dl.DownloadError, match="could not connect"):
            dl.download_file(f"http://127.0.0.1:{port}/file", tmp_path / "w.bin", SHA, timeout=2)


class socket_closed_port:
    """A loopback port with nothing listening (bound, then closed)."""

    def __enter__(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc):
        return False


def test_the_offered_public_weights_are_pinned():
    """What the module's download button fetches has a pinned sha256 and an https URL; unpinned
    sources stay listed (with their homepage) but are refused until a digest is pinned."""
    source = dl.PUBLIC_WEIGHTS[dl.DEFAULT_PUBLIC_WEIGHTS]
    assert re.fullmatch(r"[0-9a-f]{64}", source.sha256)
    assert source.url.startswith("https://") and source.homepage.startswith("https://")
    for other in dl.PUBLIC_WEIGHTS.values():
        assert other.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", other.sha256)
