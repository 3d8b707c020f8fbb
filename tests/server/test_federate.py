"""How ``cmdfed federate`` reads the end of a run: Flower's status decides, the events add details."""

from __future__ import annotations

import pytest

from cmdfed.errors import CmdfedError
from server.federate import completed_rounds

ROUND = {"event": "round", "round": 1}


def test_a_completed_run_reports_its_rounds_even_when_its_output_stopped_short():
    assert completed_rounds("7", "finished:completed", [ROUND, {"event": "finish", "status": "completed", "rounds": 3}], []) == 3
    # Flower stops streaming after a failed log upload: the status still says how the run ended.
    assert completed_rounds("7", "finished:completed", [ROUND], []) is None


def test_a_run_that_did_not_complete_is_an_error_with_the_servers_reason():
    with pytest.raises(CmdfedError, match="ended as finished:failed: pretrain round 1: no site delivered"):
        completed_rounds("7", "finished:failed", [ROUND, {"event": "error", "message": "pretrain round 1: no site delivered"}], [])
    with pytest.raises(CmdfedError, match="ended as finished:stopped: last line"):
        completed_rounds("7", "finished:stopped", [], ["last line"])
