"""The README's first command, shortened: the same chain with a few steps per phase."""

import json

import numpy as np
import pytest
from PIL import Image

from cmdfed.demo import QUICK, run_demo

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_quick_demo_runs_the_whole_chain(tmp_path):
    summary = run_demo(tmp_path / "demo", size=QUICK)
    assert summary["stores"]["slide"]["tiles"] > 20 and summary["stores"]["synthetic"]["labelled"] == QUICK.synthetic_tiles
    assert summary["pretrain"]["steps"] == QUICK.pretrain_steps and summary["finetune"]["steps"] == QUICK.finetune_steps
    assert summary["evaluation"]["tiles"] == QUICK.heldout_tiles
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written["finetune"]["checkpoint"] == summary["finetune"]["checkpoint"]
    overlay = np.asarray(Image.open(tmp_path / "demo" / "predictions" / "target_image_overlay.png"))
    assert overlay.shape == (1000, 2000, 3)  # the tile and its outlined copy side by side
    assert (tmp_path / "demo" / "predictions" / "histo_inst.png").is_file()
