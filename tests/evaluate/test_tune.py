"""Choosing the watershed settings per model: the search, what it writes, who reads it."""

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

from cmdfed.data.cpm15 import load_pair
from cmdfed.errors import CmdfedError
from cmdfed.evaluate.tune import candidates, search
from cmdfed.inference.postprocess import TUNED_FILE, WatershedParams, postprocess_for, tuned_postprocess
from cmdfed.model.config import ModelConfig
from cmdfed.model.targets import make_targets
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import finetune


def _maps_from_truth(labels: np.ndarray, rng: np.random.Generator) -> dict:
    """NP/HV maps a decent model might give: the true ones, blurred by noise."""
    targets = make_targets(labels, None)
    np_prob = np.clip(targets.nuclear_pixels + rng.normal(0, 0.25, labels.shape), 0, 1).astype(np.float32)
    hv = (targets.hv + rng.normal(0, 0.3, targets.hv.shape)).astype(np.float32)
    return {"np": np_prob, "hv": hv}


def test_search_never_ends_below_its_start_and_beats_a_bad_start():
    rng = np.random.default_rng(0)
    truths = [load_pair(i, 0.5)[1][:256, :256] for i in ("01", "02")]
    maps = [_maps_from_truth(t, rng) for t in truths]
    bad_start = WatershedParams(foreground_threshold=0.7, sobel_kernel_size=31, marker_opening_size=9)
    best, trail = search(maps, truths, bad_start, passes=2)
    assert trail[0]["params"] == asdict(bad_start)
    assert max(t["pq"] for t in trail) == next(t["pq"] for t in trail if t["params"] == asdict(best))
    assert next(t["pq"] for t in trail if t["params"] == asdict(best)) > trail[0]["pq"] + 0.05
    assert best != bad_start


def test_spatial_candidates_follow_the_resolution():
    at_20x, at_40x = WatershedParams.for_mpp(0.5), WatershedParams.for_mpp(0.25)
    assert max(candidates("sobel_kernel_size", at_20x)) < max(candidates("sobel_kernel_size", at_40x))
    assert all(k % 2 == 1 and 3 <= k <= 31 for k in candidates("sobel_kernel_size", at_40x))


@pytest.fixture(scope="module")
def run(synthetic_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "ft"
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=2, sample_every=0)
    finetune(
        synthetic_store, run, init=None, model_config=ModelConfig.from_preset("tiny"), train_config=config, device="cpu"
    )
    return run


def cmdfed(*args):
    return subprocess.run([sys.executable, "-m", "cmdfed", *args], capture_output=True, text=True, check=False)


def test_tune_writes_settings_that_predict_and_evaluate_then_use(run, synthetic_store):
    result = cmdfed(
        "train", "tune", "--checkpoint", str(run), "--store", str(synthetic_store), "--passes", "1", "--json"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["mpp"] == 0.5 and record["tiles"] == 12 and record["pq"] >= record["pq_scaled_defaults"]
    checkpoint = run / (run / "latest").read_text().strip()
    params, mpp = tuned_postprocess(checkpoint)
    assert asdict(params) == record["params"] and mpp == 0.5
    assert postprocess_for(checkpoint, 0.5) == (params, "tuned")
    assert postprocess_for(checkpoint, None) == (params, "tuned")
    evaluated = json.loads(
        cmdfed("train", "evaluate", "--checkpoint", str(run), "--store", str(synthetic_store), "--json").stdout
    )
    assert evaluated["postprocess"] == record["params"] and evaluated["postprocess_source"] == "tuned"


def test_settings_tuned_at_another_resolution_are_refused(run, synthetic_store):
    checkpoint = run / (run / "latest").read_text().strip()
    if not (checkpoint / TUNED_FILE).exists():
        (checkpoint / TUNED_FILE).write_text(json.dumps({"params": asdict(WatershedParams.for_mpp(0.5)), "mpp": 0.5}))
    with pytest.raises(CmdfedError, match="tuned for 0.5 um/px but these images are 0.25"):
        postprocess_for(checkpoint, 0.25)


def test_tune_on_an_unlabelled_store_is_one_clear_error(run, tmp_path):
    from cmdfed.data.store import Tile, create_store

    store = tmp_path / "unlabelled.zarr"
    with create_store(store, tile_size=64, mpp=0.5) as s, s.writer() as writer:
        writer.extend([Tile(image=np.zeros((64, 64, 3), np.uint8), instances=None)])
    result = cmdfed("train", "tune", "--checkpoint", str(run), "--store", str(store))
    assert result.returncode == 1 and "no labelled tiles" in result.stderr and "Traceback" not in result.stderr
