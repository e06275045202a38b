"""``cryomae gallery serve``: files inside the folder and nothing else, read-only, on this host by default."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryomae.errors import InputError
from cryomae.gallery.server import DEFAULT_HOST, INDEX_REFRESH_S, make_server, serve_in_thread
from tests.processes import ctrl_c_as_at_a_terminal

DEADLINE_S = 300.0  # for a child that never answers, far above its start-up beside other jobs; not a speed


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


def test_binds_this_host_by_default_and_refuses_a_file(tmp_path: Path) -> None:
    assert DEFAULT_HOST == "127.0.0.1"
    server = make_server(tmp_path, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    (tmp_path / "a file").write_text("not a folder")
    with pytest.raises(InputError, match="not a folder"):
        make_server(tmp_path / "a file", port=0)


def _write_page(session: Path) -> None:
    """What the writer leaves once it has picked a session's first micrograph: its page."""
    (session / "gallery").mkdir(parents=True)
    (session / "gallery" / "index.html").write_text("<html>the page</html>")


@pytest.mark.parametrize("scope", ["outputs", "session"])
def test_it_starts_before_the_first_pick_and_lists_sessions_as_they_appear(tmp_path: Path, scope: str) -> None:
    outputs = tmp_path / "outputs"  # not made yet: nothing was picked
    session = outputs / "proj" / "sess"
    root = outputs if scope == "outputs" else session
    server = make_server(root, port=0)
    serve_in_thread(server)
    try:
        port = int(server.server_address[1])
        status, body = _get(port, "/")
        assert status == 200 and b"No session yet" in body
        assert f'<meta http-equiv="refresh" content="{INDEX_REFRESH_S}">'.encode() in body  # it reloads itself
        assert b"<a href" not in body
        assert _get(port, "/healthz") == (200, b"ok\n")
        session.mkdir(parents=True)  # the writer's first files: still no page
        assert b"No session yet" in _get(port, "/")[1]
        _write_page(session)
        status, body = _get(port, "/")
        page = "proj/sess/gallery/index.html" if scope == "outputs" else "gallery/index.html"
        assert status == 200 and f'href="{page}"'.encode() in body and b"No session yet" not in body
        assert _get(port, "/" + page) == (200, b"<html>the page</html>")
    finally:
        server.shutdown()
        server.server_close()


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


def test_the_command_starts_before_the_session_has_a_page_and_ctrl_c_exits_130(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    outputs = tmp_path / "outputs"  # the session has no page, and the outputs folder is not made yet
    script = Path(sys.executable).with_name("cryomae")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "cryomae.operator.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYOMAE_")}
    args = ["gallery", "serve", "--outputs", str(outputs), "--project", "proj", "--session", "sess", "--port", "0"]
    proc = subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        preexec_fn=ctrl_c_as_at_a_terminal,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "read-only on http://localhost:" in first, first + proc.communicate(timeout=DEADLINE_S)[1]
        port = int(first.split("http://localhost:")[1].split("/")[0])
        assert "no session page yet" in proc.stdout.readline()
        assert b"No session yet" in _get(port, "/")[1]
        _write_page(outputs / "proj" / "sess")
        assert b'href="gallery/index.html"' in _get(port, "/")[1]
        assert _get(port, "/gallery/index.html") == (200, b"<html>the page</html>")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "interrupted", err
    assert rest == ""


def test_idle_half_sent_connections_cannot_hold_the_server(tmp_path: Path) -> None:
    """Issue 25, item 10: connections that send half a request and wait hold at most ``max_connections`` threads;
    one more is answered 503 at once; each idle one is closed after the timeout, and the server answers again."""
    import socket
    import threading

    (tmp_path / "index.html").write_text("<html>ok</html>")
    server = make_server(tmp_path, port=0, max_connections=4, timeout_s=5.0)  # > the 12 connects on a busy CPU
    serve_in_thread(server)
    port = int(server.server_address[1])
    threads_before = threading.active_count()
    idle = []
    try:
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
            s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n")  # no blank line: the request never ends
            idle.append(s)
        # the first 4 hold the slots (served threads); the other 8 were answered 503 and closed at once (a client
        # whose request bytes arrive after the answer may see the close as a reset instead)
        answers = []
        for s in idle[4:]:
            try:
                answers.append(s.recv(4096))
            except ConnectionResetError:
                answers.append(b"reset")
        assert all(a.startswith(b"HTTP/1.0 503") or a in (b"", b"reset") for a in answers), answers
        assert any(a.startswith(b"HTTP/1.0 503") and b"too many connections" in a for a in answers), answers
        assert threading.active_count() <= threads_before + 4
        # the idle ones are closed by the server after its timeout: each read ends (b"" or a 408)
        for s in idle[:4]:
            data = s.recv(4096)
            assert data == b"" or data.startswith(b"HTTP/1.0 408"), data
        status, body = _get(port, "/index.html")
        assert (status, body) == (200, b"<html>ok</html>")
        assert server.refused == 8
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()
