"""``cryomae gallery serve``: the session pages over HTTP, read-only, for a workstation or a cluster's Ingress.

It serves the files under one folder (the outputs folder, or one session's folder) and nothing else:

- only GET and HEAD; it writes nothing, keeps no state and needs no writable file system;
- a request's path is resolved (symlinks followed) and refused (404) unless it lies inside the folder, so
  ``..``, encoded ``%2e%2e``, absolute paths and symlinks out of the folder all end there;
- hidden names (a segment starting with ``.``, e.g. the writer's ``.cryomae`` state) are never served;
- folders are not listed; ``/`` is a page that links every session's gallery under the folder, reloading itself
  every ``INDEX_REFRESH_S`` seconds: it may start before the first pick (the folder empty, or not made yet) and
  lists each session's page as the writer writes it;
- ``/healthz`` answers ``ok`` (for Kubernetes probes);
- at most ``MAX_CONNECTIONS`` connections are served at once (more are answered 503 and closed at once), and a
  connection that makes no progress for ``REQUEST_TIMEOUT_S`` (a request sent half, a client that stopped
  reading) is closed: idle or slow clients cannot hold the server's threads.

It binds 127.0.0.1 by default: the page shows micrograph paths and project names, and has no authentication.
"""

from __future__ import annotations

import html
import http.server
import io
import posixpath
import threading
import urllib.parse
from functools import partial
from pathlib import Path
from typing import Any

from cryomae.errors import InputError
from cryomae.gallery.layout import GALLERY_DIR, INDEX_NAME

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
INDEX_REFRESH_S = 10  # the front page reloads itself: sessions appear on it as the writer writes their pages
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # the page is rewritten as the session runs
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def session_pages(root: Path) -> list[Path]:
    """Every gallery page under ``root`` (``root`` itself a session, or ``<project>/<session>`` below it), sorted."""
    pages = [root / GALLERY_DIR / INDEX_NAME, *sorted(root.glob(f"*/*/{GALLERY_DIR}/{INDEX_NAME}"))]
    return [p for p in pages if p.is_file()]


class GalleryHandler(http.server.SimpleHTTPRequestHandler):
    """Static files under ``directory``, read-only, with the checks in the module docstring."""

    server_version = "cryomae-gallery"
    sys_version = ""

    def __init__(self, *args: Any, directory: str, **kwargs: Any) -> None:
        self.root = Path(directory).resolve()
        super().__init__(*args, directory=str(self.root), **kwargs)

    def end_headers(self) -> None:
        for name, value in _HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Quiet: a page refreshing every 10 s would fill the terminal."""

    def _inside(self, url_path: str) -> Path | None:
        """The file a URL path names, or None when it is hidden, outside the folder or not a file."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path, errors="strict")
        parts = [p for p in posixpath.normpath(path).split("/") if p]
        if any(p.startswith(".") or "\x00" in p for p in parts):
            return None
        target = self.root.joinpath(*parts)
        if target.is_dir():
            target = target / "index.html"
        try:
            resolved = target.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            return None
        if any(p.startswith(".") for p in resolved.relative_to(self.root).parts):
            return None
        return resolved

    def send_head(self) -> Any:
        route = urllib.parse.urlsplit(self.path).path
        if route == "/healthz":
            return self._text(200, "ok\n", "text/plain")
        if route == "/" and not (self.root / "index.html").is_file():
            return self._text(200, self._sessions_page(), "text/html")
        try:
            found = self._inside(self.path)
        except UnicodeDecodeError:
            found = None
        if found is None:
            self.send_error(404, "not found")
            return None
        # a file inside the folder, symlinks resolved: the base class opens it (and never lists a folder)
        self.path = "/" + urllib.parse.quote(found.relative_to(self.root).as_posix())
        return super().send_head()

    def _text(self, code: int, text: str, kind: str) -> Any:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def _sessions_page(self) -> str:
        pages = session_pages(self.root)
        rows = "".join(
            f'<li><a href="{html.escape(urllib.parse.quote(p.relative_to(self.root).as_posix()))}">'
            f"{html.escape(p.parent.parent.relative_to(self.root).as_posix() or 'this session')}</a></li>"
            for p in pages
        )
        waiting = (
            '<p id="none">No session yet: each session\'s page is listed here as soon as the writer has picked its '
            "first micrograph.</p>"
        )
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="{INDEX_REFRESH_S}"><title>cryomae sessions</title></head>'
            f'<body><h1>cryomae sessions</h1>{"" if pages else waiting}<ul id="sessions">{rows}</ul>'
            f"<p>This page reloads every {INDEX_REFRESH_S} s.</p></body></html>"
        )


class GalleryServer(http.server.ThreadingHTTPServer):
    """One thread a connection, at most ``max_connections`` at once; a connection beyond them is answered 503 at
    once and closed. Each connection's socket times out after ``timeout_s`` without progress (a request sent
    half, a client that stops reading), which ends it and frees its thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int, timeout_s: float) -> None:
        super().__init__(address, handler)
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections answered 503 because all slots were taken

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.setblocking(False)
                _drain(request)  # unread bytes would make the close a reset that loses the answer
                request.settimeout(1.0)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # a thread that serves it and then frees the slot
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.timeout_s)
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _drain(sock: Any) -> None:
    """Read what a non-blocking socket has received so far (at most 64 KiB)."""
    for _ in range(16):
        try:
            if not sock.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return


BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 27\r\nRetry-After: 5\r\n"
    b"Connection: close\r\n\r\ntoo many connections: retry"
)
MAX_CONNECTIONS = 64  # connections served at once (a facility's operators, with room for their browsers' extra)
REQUEST_TIMEOUT_S = 15.0  # a connection that makes no progress this long is closed


def make_server(
    root: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    max_connections: int = MAX_CONNECTIONS,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> GalleryServer:
    """A server of ``root`` (not started: ``serve_forever``); ``port`` 0 takes a free one (``server_port``).

    ``root`` may not exist yet (a session not picked yet, outputs not written yet): ``/`` says so until it does.
    """
    if root.exists() and not root.is_dir():
        raise InputError(root, "not a folder (serve the outputs folder, or a session's folder in it)")
    handler = partial(GalleryHandler, directory=str(root))
    return GalleryServer((host, port), handler, max_connections, timeout_s)


def serve_in_thread(server: GalleryServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="gallery-server", daemon=True)
    thread.start()
    return thread
