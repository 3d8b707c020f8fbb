"""Round checkpoints in the run folder and the choice of where to resume."""

import shutil

import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.federation.checkpoints import last_complete_round, save_round
from cmdfed.model.checkpoint import load_checkpoint, resolve_checkpoint


def save(run_dir, round, phase="pretrain", strategy_state=None):
    weights = {"w": torch.full((2, 2), float(round))}
    return save_round(
        run_dir,
        round=round,
        phase=phase,
        phase_round=round,
        weights=weights,
        strategy_state=strategy_state or {},
        config={"model": {}},
        metrics={"loss": 1.0 / round},
    )


def test_a_new_run_folder_has_nothing_to_resume(tmp_path):
    assert last_complete_round(tmp_path / "absent") is None
    assert last_complete_round(tmp_path) is None


def test_resume_picks_the_last_round_that_loads(tmp_path):
    for round in (1, 2, 3):
        save(tmp_path, round, strategy_state={"m_t/w": torch.ones(2)} if round == 2 else None)
    (tmp_path / ".round-0004.abcd1234.partial").mkdir()  # a crash while writing round 4
    (tmp_path / "round-0003" / "model.safetensors").unlink()  # a disk that lost round 3's weights
    last = last_complete_round(tmp_path)
    assert (last.round, last.phase, last.phase_round) == (2, "pretrain", 2)
    assert torch.equal(last.weights["w"], torch.full((2, 2), 2.0))
    assert torch.equal(last.strategy_state["m_t/w"], torch.ones(2))
    assert last.metrics == {"loss": 0.5}


def test_a_round_is_an_ordinary_cmdfed_checkpoint(tmp_path):
    for round in (1, 2):
        save(tmp_path, round)
    assert resolve_checkpoint(tmp_path).name == "round-0002"
    assert load_checkpoint(tmp_path).step == 2
    assert not list(tmp_path.glob(".*partial"))


def test_a_round_redone_after_a_crash_replaces_the_old_folder(tmp_path):
    save(tmp_path, 1)
    shutil.copytree(tmp_path / "round-0001", tmp_path / "round-0002")  # written but `latest` not moved
    save(tmp_path, 2)
    assert torch.equal(last_complete_round(tmp_path).weights["w"], torch.full((2, 2), 2.0))


def test_a_round_of_another_checkpoint_format_stops_the_resume_instead_of_being_passed_over(tmp_path):
    for round in (1, 2):
        save(tmp_path, round)
    config = tmp_path / "round-0002" / "config.json"
    config.write_text(config.read_text().replace('"format": 2', '"format": 1'))
    with pytest.raises(CmdfedError, match="format 1, this cmdfed reads format 2"):
        last_complete_round(tmp_path)
