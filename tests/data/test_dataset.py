import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cmdfed.data.augment import BACKGROUND, random_blur, random_dihedral, random_scale, stain_jitter
from cmdfed.data.dataset import SiteDataset
from cmdfed.data.store import SiteStore


def test_items_are_tensors_of_the_right_shape(synthetic_store):
    ds = SiteDataset(synthetic_store)
    item = ds[3]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    store = SiteStore.open(synthetic_store)
    assert torch.equal(item["instances"], torch.from_numpy(store.instances(3).astype(np.int64)))
    assert item["labelled"] and int(item["index"]) == 3


def test_dihedral_moves_image_and_labels_together():
    rng = np.random.default_rng(0)
    inst = rng.integers(0, 50, (16, 16)).astype(np.int32)
    image = np.stack([inst * 5, inst, 255 - inst], axis=-1).astype(np.uint8)
    seen = set()
    for _ in range(40):
        img2, inst2, none = random_dihedral(rng, image, inst, None)
        assert none is None
        assert np.array_equal(img2[..., 0], (inst2 * 5).astype(np.uint8))
        seen.add(inst2.tobytes())
    assert len(seen) == 8  # all symmetries of the square occur


def test_stain_jitter_changes_colour_within_bounds():
    image = next(iter(__import__("cmdfed.data.synth", fromlist=["synth_tiles"]).synth_tiles(1, 64))).image
    rng = np.random.default_rng(0)
    assert np.array_equal(stain_jitter(image, rng, 0.0), image)
    jittered = stain_jitter(image, rng, 0.1)
    diff = np.abs(jittered.astype(int) - image.astype(int))
    assert 0 < diff.mean() < 30


def _dark_disc_tile(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A white tile with three dark discs (a nucleus's stain) and their instance map."""
    yy, xx = np.mgrid[:size, :size]
    instances = np.zeros((size, size), np.int32)
    for k, (cy, cx, r) in enumerate(((30, 30, 9), (60, 55, 12), (25, 70, 7)), start=1):
        instances[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    image = np.where(instances[..., None] > 0, 60, 230).astype(np.uint8).repeat(3, axis=2)
    return image, instances


def test_scale_jitter_zooms_image_and_labels_together_and_keeps_ids_whole():
    image, instances = _dark_disc_tile()
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert all(a is b for a, b in zip(random_scale(rng, 0.0, image, instances), (image, instances), strict=True))
    assert rng.bit_generator.state == state  # off: the recipe's augmentation stream is untouched
    areas = []
    for _ in range(30):
        zoomed, labels = random_scale(rng, 0.25, image, instances)
        assert zoomed.shape == image.shape and labels.shape == instances.shape and labels.dtype == instances.dtype
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        dark = zoomed[..., 0] < 145
        overlap = (dark & (labels > 0)).sum() / max((dark | (labels > 0)).sum(), 1)
        assert overlap > 0.9  # the stain is where the labels say
        if (labels == 2).any() and not (labels == 2)[[0, -1], :].any() and not (labels == 2)[:, [0, -1]].any():
            areas.append((labels == 2).sum() / (instances == 2).sum())
    assert min(areas) < 0.85 and max(areas) > 1.15  # zoomed out and in, within (1/1.25)^2 .. 1.25^2
    assert 0.6 < min(areas) and max(areas) < 1.6


def test_scale_jitter_pads_a_zoomed_out_tile_with_background():
    image, instances = _dark_disc_tile()
    rng = np.random.default_rng(1)
    padded = [
        z for z, _ in (random_scale(rng, 0.5, image, instances) for _ in range(20)) if (z == BACKGROUND).all(2).any()
    ]
    assert padded  # some draws zoom out far enough to show the padding


def test_blur_smooths_within_the_range_and_keeps_labels():
    image, _ = _dark_disc_tile()
    rng = np.random.default_rng(0)
    assert random_blur(image, rng, 0.0) is image
    blurred = random_blur(image, rng, 2.0)
    assert blurred.dtype == np.uint8 and blurred.shape == image.shape
    assert abs(float(blurred.mean()) - float(image.mean())) < 1.0  # blur moves no stain, only softens edges
    assert (
        np.abs(np.diff(blurred[..., 0].astype(int), axis=1)).max()
        <= np.abs(np.diff(image[..., 0].astype(int), axis=1)).max()
    )


def test_augmented_labels_still_match_the_store(synthetic_store):
    torch.manual_seed(0)
    ds = SiteDataset(synthetic_store, augment=True, stain_sigma=0.0)
    store = SiteStore.open(synthetic_store)
    for i in range(4):
        item = ds[i]
        image = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        candidates = random_dihedral_all(store.image(i), store.instances(i))
        assert any(np.array_equal(image, a) and np.array_equal(item["instances"].numpy(), b) for a, b in candidates)


def random_dihedral_all(image, inst):
    out = []
    for k in range(4):
        for flip in (False, True):
            a, b = np.rot90(image, k), np.rot90(inst, k)
            if flip:
                a, b = a[:, ::-1], b[:, ::-1]
            out.append((a, b))
    return out


def test_two_worker_loader_sees_every_tile_once_and_is_reproducible(synthetic_store):
    ds = SiteDataset(synthetic_store, augment=True)

    def run():
        torch.manual_seed(123)
        loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=2)
        batches = list(loader)
        return torch.cat([b["index"] for b in batches]), torch.cat([b["image"] for b in batches])

    idx1, img1 = run()
    idx2, img2 = run()
    assert sorted(idx1.tolist()) == list(range(12))
    assert torch.equal(idx1, idx2) and torch.equal(img1, img2)


def test_subset_of_indices(synthetic_store):
    ds = SiteDataset(synthetic_store, indices=[1, 5])
    assert len(ds) == 2 and int(ds[1]["index"]) == 5
    with pytest.raises(IndexError):
        ds[2]
