import json

import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.model.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((2, 3), value), "b.bias": torch.arange(4.0) * value}


def test_round_trip_and_latest(tmp_path):
    save_checkpoint(tmp_path, 5, config={"phase": "x"}, weights=weights(1.0), ema=weights(0.5), trainer={"step": 5})
    save_checkpoint(tmp_path, 10, config={"phase": "x"}, weights=weights(2.0), trainer={"step": 10})
    assert resolve_checkpoint(tmp_path).name == "step-000010"
    ckpt = load_checkpoint(tmp_path, with_trainer=True)
    assert ckpt.step == 10 and ckpt.config["phase"] == "x" and ckpt.trainer == {"step": 10}
    assert torch.equal(ckpt.weights["a.weight"], weights(2.0)["a.weight"]) and ckpt.ema is None
    early = load_checkpoint(tmp_path / "step-000005")
    assert torch.equal(early.ema["b.bias"], weights(0.5)["b.bias"])


def test_only_the_last_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, config={}, weights=weights(step), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000004", "step-000005"]
    assert not list(tmp_path.glob(".*partial"))


def test_damaged_checkpoints_name_the_file(tmp_path):
    folder = save_checkpoint(tmp_path, 1, config={}, weights=weights(1.0), trainer={"step": 1})
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CmdfedError, match=r"model.safetensors is damaged"):
        load_checkpoint(tmp_path)
    folder = save_checkpoint(tmp_path, 2, config={}, weights=weights(1.0), trainer={"step": 2})
    (folder / "trainer.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CmdfedError, match=r"trainer.pt is damaged"):
        load_checkpoint(tmp_path, with_trainer=True)
    (folder / "config.json").write_text("{")
    with pytest.raises(CmdfedError, match=r"config.json is unreadable"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(CmdfedError, match="not a cmdfed checkpoint"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(CmdfedError, match="checkpoint of format 1, this cmdfed reads format 2"):
        load_checkpoint(folder)


def test_an_older_format_serves_only_as_a_backbone(tmp_path):
    folder = save_checkpoint(tmp_path, 1, config={}, weights=weights(1.0))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format": 1}))
    assert torch.equal(load_checkpoint(folder, backbone_only=True).weights["a.weight"], weights(1.0)["a.weight"])
    with pytest.raises(CmdfedError, match="checkpoint of format 1"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({**config, "format": 99}))
    with pytest.raises(CmdfedError, match="checkpoint of format 99"):
        load_checkpoint(folder, backbone_only=True)


def test_missing_or_foreign_paths(tmp_path):
    with pytest.raises(CmdfedError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CmdfedError, match="neither a checkpoint .* nor a run folder"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step-000009")
    with pytest.raises(CmdfedError, match="points at step-000009, which is missing"):
        load_checkpoint(tmp_path)
