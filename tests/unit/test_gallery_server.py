"""``cryomae gallery serve``: files inside the folder and nothing else, read-only, on this host by default."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryomae.errors import InputError
from cryomae.gallery.server import DEFAULT_HOST, make_server, serve_in_thread


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    root = tmp_path / "outputs"
    page = root / "proj" / "sess" / "gallery"
    page.mkdir(parents=True)
    (page / "index.html").write_text("<html>the page</html>")
    (page / "session.js").write_text("window.CRYOMAE_GALLERY = {};")
    (root / "proj" / "sess" / ".cryomae").mkdir()
    (root / "proj" / "sess" / ".cryomae" / "session.json").write_text("{}")
    (root / "proj" / "sess" / "particles.star").write_text("data_particles\n")
    (tmp_path / "secret.txt").write_text("outside the outputs")
    os.symlink(tmp_path / "secret.txt", page / "link.txt")
    os.symlink(tmp_path, page / "up")
    server = make_server(root, port=0)
    serve_in_thread(server)
    try:
        yield root, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)  # the path exactly as given
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_serves_the_session_pages_and_lists_them(served: tuple[Path, int]) -> None:
    _, port = served
    assert _get(port, "/proj/sess/gallery/index.html") == (200, b"<html>the page</html>")
    assert _get(port, "/proj/sess/gallery/")[0] == 200  # a folder's index.html
    status, body = _get(port, "/")
    assert status == 200 and b'href="proj/sess/gallery/index.html"' in body
    assert _get(port, "/healthz") == (200, b"ok\n")
    assert _get(port, "/proj/sess/particles.star")[0] == 200  # the session's outputs are readable
    assert _get(port, "/proj/sess/gallery/session.js", "HEAD")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/proj/../../secret.txt",
        "/proj/sess/gallery/%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/proj/sess/gallery/link.txt",  # a symlink to a file outside
        "/proj/sess/gallery/up/secret.txt",  # through a symlink to a folder outside
        "//etc/passwd",
        "/etc/passwd",
        "/proj/sess/.cryomae/session.json",  # hidden: the writer's state
        "/proj/sess/%2ecryomae/session.json",
        "/proj/sess/",  # no folder listings
        "/proj/sess/gallery/index.html%00.txt",
        "/proj/sess/gallery/%ff",
    ],
)
def test_nothing_outside_the_folder_or_hidden_is_served(served: tuple[Path, int], path: str) -> None:
    status, body = _get(served[1], path)
    assert status == 404
    assert b"outside the outputs" not in body and b"root:" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_it_is_read_only(served: tuple[Path, int], method: str) -> None:
    root, port = served
    status, _ = _get(port, "/proj/sess/gallery/index.html", method)
    assert status in (405, 501)
    assert (root / "proj" / "sess" / "gallery" / "index.html").read_text() == "<html>the page</html>"


def test_binds_this_host_by_default_and_refuses_a_missing_folder(tmp_path: Path) -> None:
    assert DEFAULT_HOST == "127.0.0.1"
    server = make_server(tmp_path, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    with pytest.raises(InputError, match="no such folder"):
        make_server(tmp_path / "missing", port=0)


def test_the_command_serves_a_session_and_says_where(tmp_path: Path) -> None:
    import subprocess
    import sys

    page = tmp_path / "outputs" / "proj" / "sess" / "gallery"
    page.mkdir(parents=True)
    (page / "index.html").write_text("<html>the page</html>")
    script = Path(sys.executable).with_name("cryomae")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "cryomae.operator.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYOMAE_")}
    proc = subprocess.Popen(
        [*command, "gallery", "serve", "--outputs", str(tmp_path / "outputs"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "serving <folder> read-only on http://localhost:<port>/ ..."
        assert "read-only on http://localhost:" in first, first
        port = int(first.split("http://localhost:")[1].split("/")[0])
        assert proc.stdout.readline().strip() == f"http://localhost:{port}/proj/sess/gallery/index.html"
        assert _get(port, "/proj/sess/gallery/index.html") == (200, b"<html>the page</html>")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)  # reads and closes its stdout
