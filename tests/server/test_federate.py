"""How ``cmdfed federate`` reads the end of a run: Flower's status decides, the events add details."""

from __future__ import annotations

import pytest

from cmdfed.errors import CmdfedError
from server.federate import completed_rounds

ROUND = {"event": "round", "round": 1}


def test_a_completed_run_reports_its_rounds_even_when_its_output_stopped_short():
    assert (
        completed_rounds(
            "7", "finished:completed", [ROUND, {"event": "finish", "status": "completed", "rounds": 3}], []
        )
        == 3
    )
    # Flower stops streaming after a failed log upload: the status still says how the run ended.
    assert completed_rounds("7", "finished:completed", [ROUND], []) is None


def test_a_run_that_did_not_complete_is_an_error_with_the_servers_reason():
    with pytest.raises(CmdfedError, match="ended as finished:failed: pretrain round 1: no site delivered"):
        completed_rounds(
            "7", "finished:failed", [ROUND, {"event": "error", "message": "pretrain round 1: no site delivered"}], []
        )
    with pytest.raises(CmdfedError, match="ended as finished:stopped: last line"):
        completed_rounds("7", "finished:stopped", [], ["last line"])


def test_each_round_shows_the_servers_and_the_sites_scores_pq_aji_and_dice_first():
    from server.federate import evaluation_lines

    finetune = {
        "train_loss": 0.9,
        "eval_dice": 0.7,
        "eval_aji": 0.5,
        "eval_pq": 0.45,
        "eval_mpq": 0.3,
        "server_tiles": 32,
        "server_dice": 0.71,
        "server_aji": 0.52,
        "server_pq": 0.46,
    }
    assert evaluation_lines(finetune) == [
        "server evaluation on 32 tiles: PQ 0.4600, AJI 0.5200, Dice 0.7100",
        "site evaluation: PQ 0.4500, mPQ 0.3000, AJI 0.5000, Dice 0.7000",
    ]
    assert evaluation_lines({"server_tiles": 8, "server_masked_mse": 0.125}) == [
        "server evaluation on 8 tiles: masked MSE 0.1250"
    ]
    assert evaluation_lines({"train_loss": 1.0}) == []
