"""Fault injection on checkpoints (issue #14, finding 6): damaged weights are caught by the
checksum recorded when the checkpoint was written, the error names the damaged file and the
previous good checkpoint, and nothing is trained or written on top of them."""

from __future__ import annotations

import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.model.checkpoint import load_checkpoint, save_checkpoint
from cmdfed.model.config import ModelConfig
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import finetune


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"big.weight": torch.full((256, 256), value), "b.bias": torch.arange(4.0) * value}


def _overwrite_tensor_data(path, fill: bytes, size: int = 64 * 1024) -> None:
    """Overwrite ``size`` bytes in the middle of the tensor data (the header stays valid)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - size // 2
    data[start : start + size] = fill * size
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fill", [b"\x00", b"\xff"])
def test_overwritten_tensor_data_is_named_with_the_previous_good_checkpoint(tmp_path, fill):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, config={"phase": "x"}, weights=_weights(step), trainer={"step": step})
    _overwrite_tensor_data(tmp_path / "step-000003" / "model.safetensors", fill)
    (tmp_path / "step-000002" / "trainer.pt").write_bytes(b"\x00" * 10)  # the one before is damaged too
    with pytest.raises(
        CmdfedError,
        match=r"step-000003/model\.safetensors is damaged: it does not match its checksum.*"
        r"previous good checkpoint is .*step-000001",
    ):
        load_checkpoint(tmp_path, with_trainer=True)


def test_damaged_trainer_state_and_ema_are_caught_too(tmp_path):
    folder = save_checkpoint(tmp_path, 1, config={}, weights=_weights(1.0), ema=_weights(0.5), trainer={"step": 1})
    _overwrite_tensor_data(folder / "ema.safetensors", b"\x00")
    with pytest.raises(
        CmdfedError, match=r"ema\.safetensors is damaged: it does not match its checksum.*no earlier checkpoint"
    ):
        load_checkpoint(folder)


def test_checkpoints_without_a_checksum_record_still_load(tmp_path):
    """Written by an older cmdfed: loaded as before (nothing to check against)."""
    folder = save_checkpoint(tmp_path, 1, config={}, weights=_weights(1.0))
    (folder / "checksums.json").unlink()
    assert torch.equal(load_checkpoint(folder).weights["b.bias"], _weights(1.0)["b.bias"])


def test_resuming_from_damaged_weights_is_refused_and_changes_nothing(synthetic_store, tmp_path):
    class Interrupt(Exception):
        pass

    def stop_at_3(done, total, what):
        if done == 3:
            raise Interrupt

    run = tmp_path / "ft"
    config = TrainConfig(steps=4, batch_size=2, warmup_steps=1, checkpoint_every=1, sample_every=0)
    tiny = ModelConfig.from_preset("tiny")
    with pytest.raises(Interrupt):
        finetune(
            synthetic_store, run, init=None, model_config=tiny, train_config=config, device="cpu", progress=stop_at_3
        )
    assert (run / "latest").read_text() == "step-000003"
    _overwrite_tensor_data(run / "step-000003" / "model.safetensors", b"\xff")
    before = {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    with pytest.raises(CmdfedError, match=r"step-000003/model\.safetensors is damaged: it does not match.*step-000002"):
        finetune(synthetic_store, run, init=None, model_config=tiny, train_config=config, device="cpu")
    assert {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
