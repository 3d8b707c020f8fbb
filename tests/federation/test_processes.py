"""What a Flower process that exited says: its exit report, not the web server's shutdown lines."""

from __future__ import annotations

from cmdfed.federation.processes import log_tail

FLOWER_EXIT = """\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode
INFO:     Uvicorn running on http://127.0.0.1:57019 (Press CTRL+C to quit)
\x1b[91mERROR \x1b[0m:     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.

The SuperNode could not establish a connection to the SuperLink.
For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>
INFO:     Shutting down
INFO:     Waiting for application shutdown.
INFO:     Application shutdown complete.
INFO:     Finished server process [19340]
"""


def test_the_exit_report_is_shown_uncoloured_instead_of_the_shutdown_lines(tmp_path):
    log = tmp_path / "supernode.log"
    log.write_text(FLOWER_EXIT)
    assert log_tail(log) == (
        "ERROR :     Exit Code: 305 | Failed to initialize the connection to the SuperLink. | [code: 2004] Failed to "
        "activate SuperNode. | The SuperNode could not establish a connection to the SuperLink. | For more "
        "information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>"
    )


def test_without_an_exit_report_the_last_lines_are_shown(tmp_path):
    log = tmp_path / "superlink.log"
    log.write_text("one\ntwo\n\nthree\n")
    assert log_tail(log, lines=2) == "two | three"
    assert log_tail(tmp_path / "absent.log").startswith("no log at")
