"""Training from the cache: patches independent of where they are made, foreground
oversampling, the rotation margin, the whole-volume targets, Dice and bounded memory."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_helpers import make_padded_dataset, raw_config

from medseg.config import validate_config
from medseg.data.topology_targets import label_projection
from medseg.data.transforms import affine_augmentation, affine_box_margin, affine_margin, affine_matrix, rotation_axes
from medseg.errors import ConfigError
from medseg.training.data import prepare_data
from medseg.training.sampling import patch_loader, resolve_num_workers, transform_seed
from medseg.training.trainer import run_training

REPO = Path(__file__).resolve().parents[2]


def _batches(data, seed: int, workers: int) -> list[dict]:
    return list(patch_loader(data.train_set, seed, 2, 0, 4, workers, pin_memory=False))


def test_patches_do_not_depend_on_memory_or_workers(padded_dataset, tmp_path):
    aug = {"affine_prob": 0.5, "gaussian_noise_prob": 0.5, "rotate90_prob": 0.0}
    raw = raw_config(padded_dataset, tmp_path / "run", tmp_path / "cache", augmentation=aug, patch_size=[24, 16, 20])
    streamed = prepare_data(validate_config(raw))
    held = prepare_data(validate_config({**raw, "data": {**raw["data"], "cache_rate": 1.0}}))
    assert all(c._in_memory for c in held.train_set.cases) and not any(c._in_memory for c in streamed.train_set.cases)
    reference = _batches(streamed, 5, 0)
    for other in (_batches(held, 5, 0), _batches(streamed, 5, 2)):
        assert len(other) == len(reference) == 4
        for a, b in zip(reference, other):
            assert a.keys() == b.keys() == {"image", "label"}
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert reference[0]["image"].shape == (2, 1, 24, 16, 20) and reference[0]["label"].dtype == torch.int64


def test_foreground_oversampling_centres_patches_on_every_class(padded_dataset, tmp_path):
    raw = raw_config(padded_dataset, tmp_path / "run", tmp_path / "cache", foreground_oversample=1.0,
                     augmentation={"affine_prob": 0.0, "flip_prob": 0.0})
    source = prepare_data(validate_config(raw)).train_set
    seen = set()
    for k in range(40):
        label = source.make(k % len(source), transform_seed(0, k))["label"]
        centre = label[(0, *(s // 2 for s in label.shape[1:]))]
        assert int(centre) > 0  # the centre voxel is a stored foreground location
        seen.add(int(centre))
    assert seen == {1, 2}


@pytest.mark.parametrize("patch, degrees, scale", [([48, 40, 32], 15, 0.1), ([32, 32], 30, 0.2), ([24, 24, 24], 45, 0.3)])
def test_the_rotation_margin_is_enough(patch, degrees, scale):
    cfg = validate_config({
        "data": {"dataset": "d", "patch_size": patch, "augmentation": {"rotate_range_deg": degrees, "scale_range": scale}},
        "train": {"iterations": 1}, "output_dir": "o",
    })
    affine = affine_augmentation(cfg)
    worst = np.asarray(affine_margin(cfg))
    for seed in range(100):  # a sample from outside the box would bring in a zero
        affine.set_random_state(seed)
        affine.randomize()
        margin = np.asarray(affine_box_margin(affine_matrix(affine), patch))
        assert np.all(margin <= worst)
        box = [p + 2 * m for p, m in zip(patch, margin)]
        out = affine(torch.ones(1, *box), padding_mode="zeros", randomize=False)
        assert tuple(out.shape[1:]) == tuple(patch) and float(out.min()) > 1 - 1e-5  # float32 rounding only


def test_rotation_axes():
    assert rotation_axes([32, 32, 32]) == (0, 1, 2)
    assert rotation_axes([64, 64, 14]) == (2,)  # thick slices: in-plane only, as nnU-Net
    assert rotation_axes([64, 64, 22]) == (0, 1, 2)  # at most 3 times: every axis
    assert rotation_axes([16, 64, 64]) == (0,)
    assert rotation_axes([32, 32]) == (0,)
    assert rotation_axes([32, 32, 32], [2]) == (2,)  # a volume projection along axis 2 turns about it alone
    assert rotation_axes([32, 32, 32], [0, 2]) == ()
    assert rotation_axes([64, 64, 14], [0]) == ()
    assert rotation_axes([32, 32], [1]) == ()


def test_thick_slice_patches_turn_in_plane_only():
    """A 64x64x14 patch (0.8x0.8x3.5 mm) was rotated about all three axes on the voxel
    grid: a shear in millimetres (a 10 mm sphere came out 6-19 mm across)."""
    cfg = validate_config({
        "data": {"dataset": "d", "patch_size": [64, 64, 14], "augmentation": {"rotate_range_deg": 15}},
        "train": {"iterations": 1}, "output_dir": "o",
    })
    affine = affine_augmentation(cfg)
    turned = 0
    for seed in range(50):
        affine.set_random_state(seed)
        affine.randomize()
        matrix = affine_matrix(affine)
        assert np.allclose(matrix[2, :2], 0) and np.allclose(matrix[:2, 2], 0)  # the slices never tilt
        turned += abs(matrix[0, 1]) > 1e-3
    assert turned > 40  # and they do turn in-plane
    assert affine_margin(cfg)[2] <= 2  # the scaling's context alone across slices (tilting them needed 10)


def test_whole_volume_targets_survive_the_rotation(binary_padded_dataset, tmp_path):
    """The MIP loss's whole-volume target is constant along its axis; a rotation about
    another axis smeared it (IoU 0.27-0.44 against the label's own projection)."""
    raw = raw_config(binary_padded_dataset, tmp_path / "run", tmp_path / "cache", foreground_oversample=1.0,
                     augmentation={"affine_prob": 1.0, "rotate_range_deg": 30, "flip_prob": 0.0})
    raw["losses"] = [{"name": "mip", "target_projection": "volume", "axes": [2]}]
    source = prepare_data(validate_config(raw)).train_set
    for k in range(8):
        target = source.make(k % len(source), transform_seed(0, k))["label_mip"][0]
        assert torch.equal(target, target[:, :, :1].expand_as(target))  # still one value along axis 2
    raw["data"]["augmentation"]["rotate90_prob"] = 0.5
    raw["losses"] = [{"name": "mip", "target_projection": "volume", "axes": [0]}]
    with pytest.raises(ConfigError, match="rotate90_prob.*axis 0 of the MIP loss's whole-volume projection"):
        prepare_data(validate_config(raw))


def test_training_and_inference_pad_a_case_smaller_than_the_patch_alike(padded_dataset, tmp_path):
    """Training repeats a small case's border voxels out to the patch; predict and the
    validation padded with zeros, which such a network met only at inference."""
    from medseg.inference.sliding_window import _padding

    patch = [64, 64, 48]  # larger than every (cropped) case
    off = {"affine_prob": 0.0, "flip_prob": 0.0, "intensity_scale_prob": 0.0, "intensity_shift_prob": 0.0,
           "gaussian_noise_prob": 0.0, "gaussian_smooth_prob": 0.0, "gamma_prob": 0.0}
    raw = raw_config(padded_dataset, tmp_path / "run", tmp_path / "cache", patch_size=patch, augmentation=off,
                     foreground_oversample=0.0)
    source = prepare_data(validate_config(raw)).train_set
    for index in range(len(source)):
        case = source.cases[index]
        image = torch.from_numpy(case.whole()[0])
        assert all(n < p for n, p in zip(case.shape, patch))
        pads = [p for a, b in reversed(_padding(case.shape, patch)) for p in (a, b)]
        as_predicted = torch.nn.functional.pad(image[None], pads, mode="replicate")[0]  # class_maps' padding
        assert torch.equal(source.make(index, transform_seed(0, index))["image"], as_predicted)


def test_whole_volume_targets_are_cropped_with_the_patch(binary_padded_dataset, tmp_path):
    raw = raw_config(binary_padded_dataset, tmp_path / "run", tmp_path / "cache", foreground_oversample=0.5,
                     augmentation={"affine_prob": 0.0, "flip_prob": 0.0})
    raw["losses"] = [{"name": "mip", "target_projection": "volume", "axes": [0, 2]}]
    data = prepare_data(validate_config(raw))
    source = data.train_set
    for k in range(6):
        index = k % len(source)
        patch = source.make(index, transform_seed(0, k))
        image, label = source.cases[index].whole()
        whole = label_projection(label[0], axes=(0, 2))
        # find the patch in the case by its image (no augmentation moved it)
        rng = np.random.default_rng(transform_seed(0, k))
        lower = source._lower_corner(source.cases[index], rng)
        window = tuple(slice(max(a, 0), a + p) for a, p in zip(lower, source.patch))
        assert patch["label_mip"].shape == (2, *source.patch)
        np.testing.assert_array_equal(patch["label_mip"].numpy(), whole[(slice(None), *window)])
    run_training(validate_config(raw))  # the MIP loss trains on them


def test_training_from_the_cache_reaches_the_usual_dice(synthetic_dataset_3d, tmp_path):
    # test_end_to_end's config; the in-memory loader this cache replaced reached a final
    # validation Dice of 0.83-0.91 over seeds 0-7 (0.87-0.92 now)
    raw = {
        "data": {"dataset": str(synthetic_dataset_3d), "patch_size": [32, 32, 32]},
        "model": {"name": "unet", "params": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
        "train": {"iterations": 40, "batch_size": 2, "val_interval": 20, "checkpoint_interval": 40,
                  "optimizer": {"lr": 0.01}},
        "seed": 0, "device": "cpu", "output_dir": str(tmp_path / "run"),
    }
    run = run_training(validate_config(raw))
    with (run / "metrics.csv").open(newline="") as handle:
        dice = [float(r["val_dice_mean"]) for r in csv.DictReader(handle) if r["val_dice_mean"]]
    assert dice[-1] > 0.8, dice


_MEASURE = """
import json, resource, sys, torch
torch.set_num_threads(1)
from medseg.config import validate_config
from medseg.training.trainer import run_training
run_training(validate_config(json.loads(sys.argv[1])))
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB and glibc's malloc settings")
def test_training_memory_does_not_grow_with_the_number_of_cases(tmp_path):
    n = 3
    # one shape for all: the validation peak follows the largest validation case
    dataset = make_padded_dataset(tmp_path / "big", cases=4 * n, shape=(128, 128, 64), seed=3, border=3)
    names = sorted(p.name[: -len(".nii.gz")] for p in (dataset / "labelsTr").iterdir())
    # glibc's malloc otherwise keeps freed blocks of a varying size (its mmap threshold
    # adapts), which moves the peak by +-20 MB between identical runs; fixed, it is +-1 MB
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    peaks = {}
    for cases in (n, 3 * n):
        split = tmp_path / f"split{cases}.json"
        split.write_text(json.dumps({"train": names[:cases], "val": names[3 * n : 3 * n + cases // n]}))
        raw = raw_config(dataset, tmp_path / f"run{cases}", tmp_path / "cache", split_file=str(split),
                         target_spacing=None, patch_size=[32, 32, 32], num_workers=0)
        raw["train"].update(iterations=4, val_interval=4, checkpoint_interval=4)
        prepare_data(validate_config(raw))  # a warm cache: the run measures training only
        proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(raw)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[cases] = int(proc.stdout.split("MAXRSS_KB")[1].split()[0]) / 1024
    # measured: +1.4 MB streaming; holding the 6 extra training cases in memory
    # (data.cache_rate: 1, 0.9M voxels each as float32 + uint8) adds 26 MB
    assert peaks[3 * n] - peaks[n] < 15, peaks


def test_auto_workers_leave_a_core_to_training(monkeypatch):
    import medseg.preprocessing.run as run

    monkeypatch.setattr(run, "available_cpus", lambda: 2)
    assert resolve_num_workers("auto") == 1 and resolve_num_workers(3) == 3
    monkeypatch.setattr(run, "available_cpus", lambda: 1)
    assert resolve_num_workers("auto") == 0
    monkeypatch.setattr(run, "available_cpus", lambda: 64)
    assert resolve_num_workers("auto") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 torchrun processes share the 64 cores
    assert resolve_num_workers("auto") == 7


def test_validation_dice_from_counts_equals_monai():
    from monai.metrics import compute_dice

    from medseg.training import validation

    class Fixed(torch.nn.Module):  # logits that argmax to `pred`
        def __init__(self, pred):
            super().__init__()
            self.pred = pred

        def forward(self, x):
            return torch.nn.functional.one_hot(self.pred, 4).permute(0, 4, 1, 2, 3).float()

    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (1, 16, 16, 16), generator=g)  # class 3 never in the reference
    pred = torch.randint(0, 4, (1, 16, 16, 16), generator=g)
    cfg = validate_config({"data": {"dataset": "d", "patch_size": [16, 16, 16]}, "train": {"iterations": 1},
                           "output_dir": "o"})
    got = validation._case_dice(Fixed(pred), {"image": torch.zeros(1, 16, 16, 16), "label": label}, cfg, 4,
                                torch.device("cpu"), False)
    onehot = lambda t: torch.nn.functional.one_hot(t, 4).permute(0, 4, 1, 2, 3).float()  # noqa: E731
    want = compute_dice(onehot(pred), onehot(label), include_background=False, ignore_empty=True, num_classes=4)
    torch.testing.assert_close(got, want.float(), equal_nan=True)
