"""The `cmdfed` command as a user runs it: a real subprocess, exit codes and output."""

import json
import subprocess
import sys

import pytest


def cmdfed(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmdfed", *args], capture_output=True, text=True, cwd=cwd, check=False)


def command_paths() -> list[list[str]]:
    import typer.main

    from cmdfed.cli import _add_role_commands, app

    _add_role_commands()
    root = typer.main.get_command(app)
    paths = []

    def walk(cmd, prefix):
        paths.append(prefix)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, prefix + [name])

    walk(root, [])
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "cmdfed")
def test_help_on_every_level(path):
    result = cmdfed(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_synth_info_subset_json(tmp_path):
    store = tmp_path / "s.zarr"
    assert cmdfed("data", "synth", str(store), "--n", "6", "--tile", "64", "--site", "2").returncode == 0
    info = json.loads(cmdfed("data", "info", str(store), "--json").stdout)
    assert info["tiles"] == 6 and info["labelled_fraction"] == 1.0 and info["tile_size"] == 64
    result = cmdfed("data", "subset", str(store), str(tmp_path / "sub.zarr"), "--fraction", "0.5", "--json")
    assert json.loads(result.stdout)["tiles"] == 3


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    result = cmdfed("data", "info", str(tmp_path / "missing.zarr"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in result.stderr
    debug = cmdfed("--debug", "data", "info", str(tmp_path / "missing.zarr"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_usage_errors_exit_2():
    result = cmdfed("data", "synth")
    assert result.returncode == 2 and "Missing argument" in result.stderr and "internal error" not in result.stderr


def test_unknown_import_format(tmp_path):
    result = cmdfed("data", "import", "nope", str(tmp_path), str(tmp_path / "s.zarr"))
    assert result.returncode == 1 and "unknown format 'nope'" in result.stderr


def test_train_evaluate_predict_chain(tmp_path):
    store = tmp_path / "s.zarr"
    assert cmdfed("data", "synth", str(store), "--n", "4", "--tile", "64").returncode == 0
    common = ["--steps", "1", "--batch-size", "2", "--device", "cpu", "--json"]
    pre = cmdfed(
        "train", "pretrain", "--store", str(store), "--out", str(tmp_path / "pre"), "--sample-every", "1", *common
    )
    assert pre.returncode == 0, pre.stderr
    assert json.loads(pre.stdout)["steps"] == 1 and (tmp_path / "pre" / "samples" / "step-000001.png").is_file()
    ft = cmdfed(
        "train",
        "finetune",
        "--store",
        str(store),
        "--init",
        str(tmp_path / "pre"),
        "--out",
        str(tmp_path / "ft"),
        *common,
    )
    assert ft.returncode == 0, ft.stderr
    result = json.loads(ft.stdout)
    assert result["trainable_parameters"] == result["total_parameters"]  # the default recipe: end to end
    ev = cmdfed(
        "train", "evaluate", "--checkpoint", str(tmp_path / "ft"), "--store", str(store), "--device", "cpu", "--json"
    )
    metrics = json.loads(ev.stdout)
    assert (
        ev.returncode == 0
        and metrics["tiles"] == 4
        and {"mean_dice", "mean_aji", "mean_pq", "mean_det_f1"} <= set(metrics)
    )
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((50, 70, 3), 200, np.uint8)).save(tmp_path / "img.png")
    predict = [
        "predict",
        str(tmp_path / "img.png"),
        "--checkpoint",
        str(tmp_path / "ft"),
        "--out",
        str(tmp_path / "pred"),
        "--device",
        "cpu",
    ]
    unknown = cmdfed(*predict)  # the model records 0.5 um/px; a PNG records nothing
    assert unknown.returncode == 1 and "give --mpp" in unknown.stderr and not (tmp_path / "pred").exists()
    pr = cmdfed(*predict, "--mpp", "0.5")
    assert pr.returncode == 0, pr.stderr
    assert (tmp_path / "pred" / "img_inst.png").is_file()


def test_training_bad_input_is_one_line(tmp_path):
    result = cmdfed(
        "train",
        "finetune",
        "--store",
        str(tmp_path / "s.zarr"),
        "--out",
        str(tmp_path / "o"),
        "--init",
        "cmd-tiny-he",
        "--preset",
        "tiny",
    )
    assert result.returncode == 1 and "not both" in result.stderr
    assert cmdfed("data", "synth", str(tmp_path / "s.zarr"), "--n", "2", "--tile", "64").returncode == 0
    result = cmdfed(
        "train", "finetune", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "o"), "--init", "cmd-nope"
    )
    assert (
        result.returncode == 1
        and "no released model named 'cmd-nope'" in result.stderr
        and "cmd-tiny-he" in result.stderr
    )
    (tmp_path / "cfg.json").write_text('{"train": {"stepz": 1}}')
    result = cmdfed(
        "train",
        "pretrain",
        "--store",
        str(tmp_path / "s.zarr"),
        "--out",
        str(tmp_path / "o"),
        "--config",
        str(tmp_path / "cfg.json"),
    )
    assert result.returncode == 1 and "unknown TrainConfig keys ['stepz']" in result.stderr


def test_commands_load_without_the_heavy_libraries():
    """Every role's command module loads for `cmdfed --help` and for parsing any command, so
    none may import torch, Flower, Streamlit or ONNX Runtime at module level: commands import
    what they run, and the CLI answers at once."""
    code = (
        "import sys; from cmdfed.cli import _add_role_commands; _add_role_commands(); "
        "print(sorted(m for m in ('torch', 'flwr', 'streamlit', 'onnxruntime', 'opacus') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
