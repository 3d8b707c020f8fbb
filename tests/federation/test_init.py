"""A run's initial global weights from a checkpoint (``init``): what is taken, what is refused,
what is recorded, and the training resolution the rounds record."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.federation.coordinator import RoundReport, RunCoordinator, SiteReport
from cmdfed.model.checkpoint import load_checkpoint, save_checkpoint
from cmdfed.model.config import ModelConfig
from cmdfed.model.unet import build_model

CLASSES = "epithelial,lymphocyte,stromal"  # the quick_config fixture's


def make_checkpoint(run_dir, *, phase="pretrain", classes: str = "", seed=42, ema=False, **model_overrides):
    """A checkpoint as the training phases write one (``save_checkpoint``), of the tiny preset
    with ``model_overrides``; a fine-tuned one has an NC head for ``classes``."""
    names = ["background", *classes.split(",")] if classes else ["background", "nucleus"]
    config = ModelConfig.from_preset("tiny", n_classes=len(names) if classes else 0, **model_overrides)
    torch.manual_seed(seed)
    weights = build_model(config).state_dict()
    shifted = {k: v + 1.0 for k, v in weights.items()} if ema else None  # an EMA that differs from the weights
    save_checkpoint(
        run_dir,
        10,
        config={"phase": phase, "model": config.to_dict(), "class_names": names, "mpp": 0.5},
        weights=weights,
        ema=shifted,
    )
    return run_dir


def complete(coordinator, phase, phase_round, resolutions):
    aggregated = {k: v + 0.01 for k, v in coordinator.sent_weights(phase).items()}
    report = RoundReport(
        0.0,
        [SiteReport("site-1", "trained", 6, {"loss": 1.0}, 2.0)],
        bytes_sent=10,
        bytes_received=5,
        train_metrics={"loss": 1.0},
        resolutions=resolutions,
    )
    return coordinator.complete_round(phase, phase_round, aggregated, {}, report)


def test_a_pretrained_init_gives_backbone_and_modulation_fresh_heads_and_is_recorded(quick_config, tmp_path):
    init = make_checkpoint(tmp_path / "pretrained", ema=True, head_width=16)
    saved = load_checkpoint(init)
    config = quick_config(init=str(init), pretrain_rounds=0, eval_every=0)
    coordinator = RunCoordinator(config)
    assert (
        coordinator.architecture.head_width == 16 and coordinator.architecture.n_classes == 4
    )  # the checkpoint's, run's NC head
    for key, value in coordinator.weights.items():
        if not key.startswith("heads."):
            assert torch.equal(value, saved.ema[key]), key  # the EMA weights: pretraining's result
    torch.manual_seed(config.seed)
    seeded = build_model(config.model_config("pretrain", coordinator.architecture)).state_dict()
    assert all(torch.equal(coordinator.weights[k], seeded[k]) for k in seeded if k.startswith("heads."))

    sha = hashlib.sha256((saved.path / "ema.safetensors").read_bytes()).hexdigest()
    pinned = json.loads((coordinator.run_dir / "run.json").read_text())["init"]
    assert (pinned["init"], pinned["sha256"], pinned["heads"], pinned["weights_file"]) == (
        str(init),
        sha,
        "fresh",
        "ema.safetensors",
    )
    path = complete(coordinator, "finetune", 1, [0.5, 0.5])
    round_config = json.loads((path / "config.json").read_text())
    assert round_config["init"]["sha256"] == sha and round_config["model"]["head_width"] == 16
    assert round_config["mpp"] == 0.5  # every averaged site's store agreed
    assert load_checkpoint(coordinator.run_dir).config["init"]["init"] == str(
        init
    )  # an ordinary checkpoint says where it started


def test_a_fine_tuned_init_of_the_runs_classes_keeps_its_heads(quick_config, tmp_path):
    init = make_checkpoint(tmp_path / "segmenter", phase="finetune", classes=CLASSES)
    coordinator = RunCoordinator(quick_config(init=str(init), pretrain_rounds=0))
    saved = load_checkpoint(init).weights
    assert all(torch.equal(v, saved[k]) for k, v in coordinator.weights.items())  # heads too
    assert coordinator.init["heads"] == "kept"


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "missing name",
            "init: checkpoint cmd-nope does not exist, and no released model named 'cmd-nope'; released models: ",
        ),
        (
            "missing path",
            (
                "init: checkpoint .*elsewhere/run does not exist; set init to a checkpoint or run folder on the "
                "server, a released"
            ),
        ),
        ("other preset", "is a 'tiny' model but the run's preset is 'base'; set preset = \"tiny\""),
        (
            "other classes",
            (
                "is fine-tuned for classes 'tumour,immune' but the run classifies 'epithelial,lymphocyte,stromal'; "
                'set classes = "tumour,immune" to continue'
            ),
        ),
        ("no NC head", "is fine-tuned for classes '\\(none: no NC head\\)' but the run classifies"),
    ],
)
def test_an_init_that_is_missing_or_conflicts_with_the_run_is_refused_before_the_run_begins(
    quick_config, tmp_path, case, message
):
    init = {
        "missing name": "cmd-nope",
        "missing path": str(tmp_path / "elsewhere" / "run"),
        "other preset": str(make_checkpoint(tmp_path / "pre")),
        "other classes": str(make_checkpoint(tmp_path / "ft", phase="finetune", classes="tumour,immune")),
        "no NC head": str(make_checkpoint(tmp_path / "ft0", phase="finetune")),
    }[case]
    config = quick_config(init=init, preset="base" if case == "other preset" else "tiny")
    with pytest.raises(CmdfedError, match=message):
        RunCoordinator(config)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_pinned_init_whose_weights_changed_before_the_first_round_is_refused(quick_config, tmp_path):
    init = make_checkpoint(tmp_path / "pretrained")
    config = quick_config(init=str(init), eval_every=0)
    RunCoordinator(config)  # the server stopped before round 1
    make_checkpoint(init, seed=7)  # someone retrained into the same folder
    with pytest.raises(CmdfedError, match="pinned init .* with weights sha256 .* now holds"):
        RunCoordinator(config)


def test_a_resumed_run_needs_its_init_no_more_and_keeps_recording_it(quick_config, tmp_path):
    import shutil

    init = make_checkpoint(tmp_path / "pretrained", head_width=16)
    config = quick_config(init=str(init), eval_every=0)
    first = RunCoordinator(config)
    complete(first, "pretrain", 1, [0.5])
    shutil.rmtree(init)  # moved away after the run began
    resumed = RunCoordinator(config)
    assert list(resumed.remaining("pretrain")) == [2] and resumed.architecture.head_width == 16
    path = complete(resumed, "pretrain", 2, [0.5])
    assert json.loads((path / "config.json").read_text())["init"] == first.init


def test_the_training_resolution_is_recorded_only_while_every_averaged_site_agrees(quick_config):
    config = quick_config(eval_every=0, pretrain_rounds=2, finetune_rounds=2)
    coordinator = RunCoordinator(config)
    mpp = lambda path: json.loads((path / "config.json").read_text())["mpp"]
    assert mpp(complete(coordinator, "pretrain", 1, [0.25, 0.5])) is None  # pretraining on mixed scanners
    assert mpp(complete(coordinator, "pretrain", 2, [0.5])) is None  # the phase's weights saw both
    assert mpp(complete(coordinator, "finetune", 1, [0.5, 0.5])) == 0.5  # fine-tuning is judged on its own sites
    resumed = RunCoordinator(config)
    assert mpp(complete(resumed, "finetune", 2, [0.5])) == 0.5
    unknown = RunCoordinator(quick_config(run_dir=config.run_dir + "-2", eval_every=0))
    assert mpp(complete(unknown, "pretrain", 1, [0.5, float("nan")])) is None  # a store without mpp


def test_finetuning_all_sends_every_group_and_freezes_none(quick_config):
    config = quick_config(finetune_trainable="all")
    coordinator = RunCoordinator(config)
    assert config.frozen_groups("finetune") == ()
    assert set(coordinator.sent_weights("finetune")) == set(coordinator.weights)
    assert config.model_config("finetune").drop_path == config.model_config("pretrain").drop_path
    assert np.isfinite(np.concatenate([v.ravel() for v in coordinator.sent_weights("finetune").values()])).all()


def test_a_run_folder_begun_before_init_existed_still_resumes(quick_config):
    config = quick_config(eval_every=0)
    first = RunCoordinator(config)
    complete(first, "pretrain", 1, [0.5])
    run_json = first.run_dir / "run.json"
    pinned = json.loads(run_json.read_text())
    del pinned["config"]["init"]  # as an earlier cmdfed pinned it
    run_json.write_text(json.dumps(pinned))
    resumed = RunCoordinator(config)
    assert resumed.run_id == first.run_id and list(resumed.remaining("pretrain")) == [2] and resumed.init is None
    with pytest.raises(CmdfedError, match="differ in init"):
        RunCoordinator(quick_config(eval_every=0, init="cmd-anything"))
