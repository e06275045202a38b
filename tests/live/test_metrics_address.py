"""Where the metrics and health endpoint listens (item 17): ``cryomae run`` with default settings serves
/metrics, /healthz and /readyz on 127.0.0.1 only, as the kernel's socket table shows; an address set in the
settings (what the container images and the chart do) is used as given."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cryomae.service.app import App, serve
from cryomae.settings import Settings
from tests.live.conftest import Live, wait_until

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}


def _listening(port: int) -> set[str]:
    """The local addresses of the listening TCP sockets on ``port`` (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != LISTEN or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word of the address in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(packed)))
    return found


@contextmanager
def _served(settings: Settings) -> Iterator[App]:
    """``serve`` of every service (what ``cryomae run`` does) on a thread, until the block ends."""
    app = App(settings)
    stop = threading.Event()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(serve(app, stop, check_every_s=0.2)))
    thread.start()
    try:
        wait_until(lambda: app.health is not None, 30, "the HTTP endpoint")
        yield app
    finally:
        stop.set()
        thread.join(60)
    assert codes == [0]


def test_cryomae_run_serves_metrics_on_localhost_only_by_default(live: Live) -> None:
    """Both transports: the one-process mode and the services over the real RabbitMQ (``transport`` fixture)."""
    settings = live.settings(metrics_port=0)  # any free port; the address is the default one
    assert "metrics_host" not in settings.model_fields_set
    with _served(settings) as app:
        assert app.health is not None
        assert _listening(app.health.port) == {"127.0.0.1"}


@pytest.mark.parametrize("transport", ["memory"])
def test_an_address_from_the_settings_is_used_as_given(live: Live) -> None:
    with _served(live.settings(metrics_port=0, metrics_host="0.0.0.0")) as app:
        assert app.health is not None
        assert _listening(app.health.port) == {"0.0.0.0"}
