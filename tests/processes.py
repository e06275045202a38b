"""Helpers for tests that start commands as child processes."""

from __future__ import annotations

import signal


def ctrl_c_as_at_a_terminal() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: Ctrl-C handled as at a terminal.

    A shell that starts a job in the background (``cmd &`` in a script, ``nohup``) makes it ignore SIGINT, and its
    children inherit that; Python then installs no KeyboardInterrupt handler, so a child of a test run started that
    way would never see the test's Ctrl-C. The child gets the default disposition back, as under a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
