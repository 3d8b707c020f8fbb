"""From an image to nuclei with the PyTorch model: what evaluation and `cmdfed predict` run
(the edge swaps the forward for ONNX Runtime / TensorRT, edge.backends, and keeps the rest).

    uint8 RGB image --normalised (stain.py)--> the training images' colours --to_model_input-->
        [-1, 1] tensor --model.segment--> NP/HV/NC maps --postprocess (HoVer-Net watershed)-->
        instance map, type map, per-nucleus records

A model whose checkpoint records its training images' stains (``stain_reference``) sees each
image re-stained as them (Macenko, from the image's own stains), unless loaded with
``stain_normalise=False``.

Images of any size: sides are padded up to the network's stride (32) by reflection, which
keeps texture at the border statistically like tissue. Images larger than ``window`` are
run as overlapping windows (:mod:`cmdfed.inference.tiling`'s grid, flush with the far
edges) and the maps are blended with a weight that falls towards each
window's edge (border pixels see less context), then post-processed once as a whole, so
nuclei on window seams are neither cut nor duplicated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmdfed.atomic import atomic_path, write_json_atomic
from cmdfed.errors import CmdfedError
from cmdfed.images import read_rgb
from cmdfed.inference.postprocess import PostprocessResult, WatershedParams, postprocess, postprocess_for
from cmdfed.inference.stain import REFERENCE_KEY, HEStains, normalised
from cmdfed.inference.tiling import grid_starts, needs_resampling, resample_image, resampled_shape, to_image_pixels
from cmdfed.model.checkpoint import load_checkpoint
from cmdfed.model.config import ModelConfig
from cmdfed.model.encoders import frozen_encoder
from cmdfed.model.unet import build_model
from cmdfed.progress import Progress, report

STRIDE = 32


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W,3) or float (B,3,H,W) in [0, 1] -> float (B,3,H,W) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise CmdfedError(f"expected uint8 RGB images (B, H, W, 3), got {images.dtype} {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
    return images * 2.0 - 1.0


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    class_names: list[str]
    checkpoint: Path
    device: torch.device
    encoder: torch.nn.Module | None = None  # the frozen FM encoder of an FM-conditioned model
    mpp: float | None = None  # the resolution it was trained at (um/px), when its checkpoint records it
    stain_reference: HEStains | None = None  # its training images' stains; None: images as scanned


def load_model(
    checkpoint: str | Path,
    device: torch.device,
    *,
    use_ema: bool = True,
    fm_weights: str | Path | None = None,
    stain_normalise: bool = True,
) -> LoadedModel:
    """A model ready for inference from a checkpoint folder or run folder; ``fm_weights``: the
    local weights file of its timm FM encoder, when it was trained with one; ``stain_normalise``
    False: images are segmented as scanned even when the checkpoint records a stain reference."""
    ckpt = load_checkpoint(checkpoint)
    if "model" not in ckpt.config:
        raise CmdfedError(f"{ckpt.path} has no model config")
    config = ModelConfig.from_dict(ckpt.config["model"])
    model = build_model(config)
    weights = ckpt.ema if (use_ema and ckpt.ema is not None) else ckpt.weights
    weights = {k.removeprefix("module."): v for k, v in weights.items() if k != "n_averaged"}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CmdfedError(
            f"{ckpt.path}: the weights do not match the config in config.json ({str(exc)[:300]})"
        ) from exc
    model.to(device).eval()
    names = ckpt.config.get("class_names") or ["background", "nucleus"]
    mpp = ckpt.config.get("mpp")
    reference = ckpt.config.get(REFERENCE_KEY)
    return LoadedModel(
        model,
        config,
        list(names),
        ckpt.path,
        device,
        frozen_encoder(config.fm_kind, fm_weights, device),
        float(mpp) if mpp else None,
        HEStains.from_dict(reference, str(ckpt.path)) if reference and stain_normalise else None,
    )


@torch.no_grad()
def predict_maps(
    model: torch.nn.Module, images: np.ndarray, device: torch.device, encoder: torch.nn.Module | None = None
) -> dict[str, np.ndarray]:
    """NP probability (B,H,W), HV (B,2,H,W), NC probabilities (B,C,H,W) or absent; sides multiple of 32.
    ``encoder``: the frozen FM encoder of an FM-conditioned model (``LoadedModel.encoder``)."""
    x = to_model_input(images).to(device)
    out = model.segment(x, None if encoder is None else encoder(x, None))
    np_logits = out["np"].float()
    np_prob = np_logits.softmax(1)[:, 1] if np_logits.shape[1] == 2 else np_logits.sigmoid()[:, 0]
    maps = {"np": np_prob.cpu().numpy(), "hv": out["hv"].float().cpu().numpy()}
    if out.get("nc") is not None:
        maps["nc"] = out["nc"].float().softmax(1).cpu().numpy()
    return maps


def _pad_to_stride(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = image.shape[:2]
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        mode = "reflect" if h > ph and w > pw else "edge"
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)
    return image, (h, w)


def _window_weight(size: int, margin: int) -> np.ndarray:
    ramp = np.minimum(np.arange(size) + 1, np.arange(size)[::-1] + 1).astype(np.float32)
    ramp = np.clip(ramp / max(margin, 1), 1e-3, 1.0)
    return np.outer(ramp, ramp)


def predict_image_maps(
    loaded: LoadedModel, image: np.ndarray, *, window: int = 1024, overlap: int = 128
) -> dict[str, np.ndarray]:
    """Maps for one uint8 RGB image of any size (see module docstring)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise CmdfedError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    padded, (h, w) = _pad_to_stride(image)
    H, W = padded.shape[:2]
    if H <= window and W <= window:
        maps = predict_maps(loaded.model, padded[None], loaded.device, loaded.encoder)
        return {k: v[0][..., :h, :w] for k, v in maps.items()}
    window = window - window % STRIDE
    weight = _window_weight(window, overlap)
    sums: dict[str, np.ndarray] = {}
    total = np.zeros((H, W), np.float32)
    for y in grid_starts(H, window, overlap):
        for x in grid_starts(W, window, overlap):
            crop = padded[y : y + window, x : x + window]
            maps = predict_maps(loaded.model, crop[None], loaded.device, loaded.encoder)
            ch, cw = crop.shape[:2]
            wgt = weight[:ch, :cw]
            for key, value in maps.items():
                value = value[0]
                if key not in sums:
                    sums[key] = np.zeros(value.shape[:-2] + (H, W), np.float32)
                sums[key][..., y : y + ch, x : x + cw] += value * wgt
            total[y : y + ch, x : x + cw] += wgt
    return {k: (v / total)[..., :h, :w] for k, v in sums.items()}


def segment_image(
    loaded: LoadedModel,
    image: np.ndarray,
    params: WatershedParams = WatershedParams(),
    *,
    image_mpp: float | None = None,
) -> PostprocessResult:
    """Nuclei of one image. At ``image_mpp`` other than the model's, the image is segmented
    at the model's resolution and the result brought back to its pixels (tiling.py);
    ``params`` then hold at the model's resolution. The image is stain-normalised at the
    model's resolution when the model has a reference (module docstring)."""
    if not needs_resampling(image_mpp, loaded.mpp):
        maps = predict_image_maps(loaded, normalised(image, loaded.stain_reference))
        return postprocess(maps["np"], maps["hv"], maps.get("nc"), params)
    shape = image.shape[:2]
    small = resample_image(image, resampled_shape(shape, image_mpp / loaded.mpp))
    maps = predict_image_maps(loaded, normalised(small, loaded.stain_reference))
    at_model = postprocess(maps["np"], maps["hv"], maps.get("nc"), params)
    return to_image_pixels(at_model, maps.get("nc"), shape)


def write_prediction(out_dir: Path, name: str, result: PostprocessResult, class_names: list[str]) -> dict:
    """NAME_inst.png (uint16 instance ids) and NAME_types.json (one record per nucleus)."""
    if result.instance_map.max() > np.iinfo(np.uint16).max:
        raise CmdfedError(f"{name}: more than 65535 nuclei do not fit a uint16 PNG; tile the image first")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / f"{name}_inst.png") as tmp:
        Image.fromarray(result.instance_map.astype(np.uint16)).save(tmp, format="PNG")
    nuclei = [
        {
            "id": n.id,
            "type": n.type,
            "type_name": class_names[n.type] if n.type is not None and n.type < len(class_names) else None,
            "type_prob": n.type_prob,
            "centroid_xy": [float(c) for c in n.centroid_xy],
            "area": int(n.area),
        }
        for n in result.nuclei
    ]
    write_json_atomic(out_dir / f"{name}_types.json", {"image": name, "class_names": class_names, "nuclei": nuclei})
    return {"image": name, "nuclei": len(nuclei), "instances": str(out_dir / f"{name}_inst.png")}


def predict_files(
    images: list[Path],
    checkpoint: Path,
    out_dir: Path,
    device: torch.device,
    progress: Progress | None = None,
    *,
    fm_weights: str | Path | None = None,
    mpp: float | None = None,
    stain_normalise: bool = True,
) -> list[dict]:
    """`cmdfed predict`: NAME_inst.png and NAME_types.json for each image (any dtype the
    importers read: 16-bit scans are scaled, not clipped), in the images' own pixels.

    ``mpp``, the images' resolution: a model that records the resolution it was trained at
    reads the images resampled to it (tiling.py), and then needs ``mpp`` (image files
    rarely say theirs). The post-processing is the checkpoint's tuned one, else HoVer-Net's
    scaled to the resolution segmented at (``WatershedParams.for_mpp``; unknown: its 40x values).
    Each image is stain-normalised by its own statistics when the model records a reference
    (``stain_normalise`` False: as scanned)."""
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise CmdfedError(f"image(s) not found: {', '.join(missing)}")
    stems = Counter(Path(p).stem for p in images)
    clashes = sorted(stem for stem, n in stems.items() if n > 1)
    if clashes:
        raise CmdfedError(
            f"several images are named {', '.join(clashes)} (outputs are NAME_inst.png): "
            "rename them or predict them into different --out folders"
        )
    loaded = load_model(checkpoint, device, fm_weights=fm_weights, stain_normalise=stain_normalise)
    if loaded.mpp is not None and mpp is None:
        raise CmdfedError(
            f"the model reads images at {loaded.mpp} um/px and resamples others to it, but these "
            "images' resolution is unknown: give --mpp (about 0.5 at 20x, 0.25 at 40x)"
        )
    params, _ = postprocess_for(loaded.checkpoint, loaded.mpp or mpp)
    results = []
    for done, path in enumerate(images, start=1):
        result = segment_image(loaded, read_rgb(path), params, image_mpp=mpp)
        results.append(write_prediction(out_dir, Path(path).stem, result, loaded.class_names))
        report(progress, done, len(images), "images")
    return results
