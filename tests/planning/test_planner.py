"""Plans of small synthetic datasets, nnU-Net's rules, and the memory budget on made-up fingerprints."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.models.factory import downsampling_factors
from medseg.planning import compute_fingerprint, plan_experiment, run_plan, target_spacing, unet_topology
from medseg.models.factory import build_on_meta
from medseg.planning.memory import estimate_training_memory
from medseg.planning.planner import PlanWarning

# nnunetv2 2.8.1's get_pool_and_conv_props(spacing, patch, 4, 999999) on these inputs:
# (spacing, patch) -> (strides, kernels, patch, divisor)
NNUNET_TOPOLOGIES = [
    ([1.0, 1.0, 1.0], [128, 128, 128], [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, [128, 128, 128], [32, 32, 32]),
    ([0.8, 0.8, 5.0], [224, 224, 32], [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
     [[3, 3, 1], [3, 3, 1]] + [[3, 3, 3]] * 4, [224, 224, 32], [32, 32, 8]),
    ([0.7, 0.7, 2.5], [160, 192, 56], [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
     [[3, 3, 1]] + [[3, 3, 3]] * 5, [160, 192, 56], [32, 32, 8]),
    ([1.0, 1.0], [512, 512], [[1, 1]] + [[2, 2]] * 7, [[3, 3]] * 8, [512, 512], [128, 128]),
    ([0.5, 1.5], [300, 100], [[1, 1], [2, 1], [2, 2], [2, 2], [2, 2], [2, 2]], [[3, 1]] + [[3, 3]] * 5, [320, 112], [32, 16]),
    ([3.0, 0.6, 0.6], [20, 300, 280], [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]],
     [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5, [20, 320, 320], [4, 64, 64]),
    ([1.0, 1.0, 1.0], [13, 40, 40], [[1, 1, 1], [2, 2, 2], [1, 2, 2], [1, 2, 2]], [[3, 3, 3]] * 4, [14, 40, 40], [2, 8, 8]),
]


@pytest.mark.parametrize("spacing, patch, strides, kernels, padded, divisor", NNUNET_TOPOLOGIES)
def test_topology_matches_nnunet(spacing, patch, strides, kernels, padded, divisor):
    topo = unet_topology(spacing, patch)
    assert (topo.strides, topo.kernel_sizes, topo.patch_size, topo.divisor) == (strides, kernels, padded, divisor)


def test_target_spacing_rules():
    iso = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.2], [0.9, 0.9, 1.0]])
    assert target_spacing(iso, np.full((3, 3), 100.0))[0] == [1.0, 1.0, 1.0]
    # anisotropic spacing and voxels: the coarse axis takes the 10th percentile of its spacings
    z = np.array([5, 5, 5, 5, 5, 5, 5, 5, 2.0, 3.0])
    spacings = np.stack([np.full(10, 0.8), np.full(10, 0.8), z], axis=1)
    shapes = np.tile([256.0, 256.0, 40.0], (10, 1))
    spacing, rule = target_spacing(spacings, shapes)
    assert spacing == pytest.approx([0.8, 0.8, 2.9]) and "10th percentile" in rule
    # ... but never finer than the other axes
    spacings[:, 2] = [5, 5, 5, 5, 5, 5, 5, 5, 0.5, 0.5]
    assert target_spacing(spacings, shapes)[0] == pytest.approx([0.8, 0.8, 0.8 + 1e-5])
    # anisotropic spacing alone (as many slices as in-plane voxels) keeps the median
    assert target_spacing(spacings, np.tile([256.0, 256.0, 200.0], (10, 1)))[0] == pytest.approx([0.8, 0.8, 5.0])


def _check_runnable(config_path, plan):
    cfg = load_config(config_path)
    patch = cfg.data.patch_size
    assert patch == plan["patch_size"] and cfg.train.batch_size == plan["batch_size"] >= 2
    info = plan["dataset"]
    classes = max(v for k, v in info["labels"].items() if k != "ignore") + 1
    # builds (on the meta device where the network allows) and checks divisibility
    build_on_meta(cfg.model.name, cfg.model.params, len(patch), len(info["channel_names"]), classes, patch)
    if cfg.model.name in ("dynunet", "unet"):
        factors = downsampling_factors(cfg.model.name, cfg.model.params, len(patch))
        assert factors == plan["divisible_by"] and all(p % f == 0 for p, f in zip(patch, factors))
    return cfg


@pytest.mark.parametrize(
    "fixture, spacing, kernel0",
    [("iso_dataset", [1.0, 1.0, 1.0], [3, 3, 3]), ("aniso_dataset", [0.8, 0.8, 5.0], [3, 3, 1]),
     ("flat_dataset", [1.0, 1.0], [3, 3]), ("multi_dataset", [1.0, 1.0, 1.5], [3, 3, 3])],
)
def test_plan_datasets(fixture, spacing, kernel0, request, tmp_path):
    dataset = request.getfixturevalue(fixture)
    config = tmp_path / "plan" / "config.yaml"
    result = run_plan(dataset, output=config, workers=1, progress=False, output_dir=tmp_path / "run")
    plan = result.plan
    assert plan["target_spacing"] == pytest.approx(spacing)
    assert {p.name for p in config.parent.iterdir()} == {
        "config.yaml", "plans.json", "fingerprint.json", "fingerprint_samples.npz"
    }
    assert json.loads((config.parent / "plans.json").read_text())["patch_size"] == plan["patch_size"]
    cfg = _check_runnable(config, plan)
    assert cfg.data.target_spacing == pytest.approx(spacing)
    assert cfg.model.params["kernel_size"][0] == kernel0
    # the images are smaller than any memory limit: the patch is the median image, rounded up
    topo = unet_topology(spacing, [round(v) for v in plan["median_shape_at_target"]])
    assert plan["patch_size"] == topo.patch_size
    text = config.read_text()
    assert text.count("\n  # ") >= 8  # each planned choice is explained
    assert result.warnings == []


def test_plan_natural_images(synthetic_dataset_2d_png, tmp_path):
    """PNGs carry no geometry: unit spacing and no reorientation."""
    result = run_plan(synthetic_dataset_2d_png, output=tmp_path / "c.yaml", workers=1, progress=False)
    cfg = _check_runnable(tmp_path / "c.yaml", result.plan)
    assert cfg.data.orientation is None and cfg.data.target_spacing == [1.0, 1.0]


def test_plan_multichannel_multilabel(multi_dataset, tmp_path):
    result = run_plan(multi_dataset, output=tmp_path / "c.yaml", workers=2, progress=False, topology_loss="cldice")
    plan = result.plan
    ct, t2 = plan["normalization"]
    assert ct["scheme"] == "ct" and len(ct["clip"]) == 2 and t2 == {"name": "T2", "scheme": "zscore"}
    fingerprint = json.loads((tmp_path / "fingerprint.json").read_text())
    assert ct["clip"] == [fingerprint["intensity"][0]["percentile_00_5"], fingerprint["intensity"][0]["percentile_99_5"]]
    # the lesion is in two of three cases and under 1% of the voxels: rare; vessels are thin
    assert "rare label(s) lesion" in plan["foreground_oversample_rule"]
    assert plan["foreground_oversample"] > 0.33
    cldice = plan["losses"][1]
    p90 = max(t["radius_voxels"]["p90"] for t in plan["thickness"].values())
    assert cldice["name"] == "cldice" and cldice["iterations"] == min(max(math.ceil(p90), 1), 10)
    cfg = _check_runnable(tmp_path / "c.yaml", plan)
    assert [t.name for t in cfg.losses] == ["dice_ce", "cldice"]


@pytest.mark.parametrize("model", ["unet", "unetr", "swinunetr"])
def test_plan_other_models(model, iso_dataset, tmp_path):
    fingerprint, _ = compute_fingerprint(iso_dataset, workers=1, progress=False)
    plan = plan_experiment(fingerprint, model=model)
    factor = {"unet": None, "unetr": 16, "swinunetr": 32}[model]
    if factor:
        assert all(p % factor == 0 for p in plan["patch_size"])
    assert plan["batch_size"] >= 2
    from medseg.planning.writer import render_config

    path = tmp_path / "c.yaml"
    path.write_text(render_config(plan))
    _check_runnable(path, plan)
    # the config's comment gives the transformers' smallest patch (it said "clipped to the
    # median image" of 32 voxels, and the patch read 64)
    smallest = {"unet": None, "unetr": 16, "swinunetr": 64}[model]
    assert (f"at least {smallest} per axis" in path.read_text()) == (smallest is not None)
    if smallest:
        assert min(plan["patch_size"]) >= smallest


def _fake_fingerprint(shape, spacing, cases=20, channels=("CT",)):
    """A fingerprint of ``cases`` images of ``shape`` voxels at ``spacing`` mm (no data needed)."""
    dims = len(shape)
    voxels = int(np.prod(shape))
    record = {
        "shape": list(shape), "spacing": list(spacing), "axcodes": "RAS"[:dims], "num_voxels": voxels,
        "label_voxels": {"0": voxels - voxels // 50, "1": voxels // 50}, "has_foreground": True,
        "intensity": [], "thickness": {"1": {"skeleton_voxels": 100, "radius_mm": {"p10": 1.0, "p50": 2.0, "p90": 4.0}, "sampled": True}},
    }
    return {
        "dataset": {"root": "/data/x", "name": "Fake", "file_ending": ".nii.gz",
                    "channel_names": {str(i): c for i, c in enumerate(channels)},
                    "labels": {"background": 0, "vessel": 1}, "num_cases": cases},
        "cases": [dict(record, name=f"case_{i:03d}") for i in range(cases)],
        "labels": {"background": {"value": 0, "ratio_mean": 0.98, "ratio_std": 0.0, "presence": 1.0},
                   "vessel": {"value": 1, "ratio_mean": 0.02, "ratio_std": 0.0, "presence": 1.0,
                              "radius_mm": {"p10": 1.0, "p50": 2.0, "p90": 4.0}}},
        "intensity": [{"name": c, "n": 0} for c in channels],
    }


def test_memory_budget_bounds_patch_and_batch():
    """CT-sized images: the patch shrinks to the budget, and more memory buys patch, then batch."""
    fingerprint = _fake_fingerprint([512, 512, 300], [0.7, 0.7, 1.0])
    plans = {gb: plan_experiment(fingerprint, gpu_memory_gb=gb) for gb in (4, 8, 24)}
    for gb, plan in plans.items():
        assert plan["target_spacing"] == pytest.approx([0.7, 0.7, 1.0])
        assert plan["memory"]["estimate_gib"] <= gb
        assert all(p % d == 0 for p, d in zip(plan["patch_size"], plan["divisible_by"]))
        assert plan["batch_size"] >= 2
    volume = {gb: np.prod(p["patch_size"]) for gb, p in plans.items()}
    assert volume[4] < volume[8] <= volume[24]
    assert np.prod(plans[8]["patch_size"]) < 512 * 512 * 300  # the budget, not the image, bounded it
    # one more shrinking step would have fitted the budget too: the plan stops at the first fit
    params = plans[8]["network"]["params"]
    est = estimate_training_memory("dynunet", params, 3, 1, 2, plans[8]["patch_size"], 2)
    assert est.total_gib == pytest.approx(plans[8]["memory"]["estimate_gib"], abs=1e-3)


@pytest.mark.parametrize("shape", [[12, 11, 9], [13, 12], [40, 40, 6]])
def test_dynunet_on_small_images_gets_the_three_stages_monai_needs(shape):
    """Images of 8-15 voxels gave two stages: MONAI's DynUNet refused its own plan, blaming
    model.params.kernel_size; the patch is now raised (and padded) to three stages."""
    spacing = [1.0] * len(shape) if len(shape) == 2 or shape[2] > 6 else [0.8, 0.8, 4.0]
    plan = plan_experiment(_fake_fingerprint(shape, spacing), model="dynunet")
    params = plan["network"]["params"]
    assert len(params["strides"]) >= 3 and len(params["kernel_size"]) == len(params["strides"])
    classes, patch = 2, plan["patch_size"]
    net = build_on_meta("dynunet", params, len(shape), 1, classes, patch)  # MONAI accepts it
    import torch

    out = net(torch.zeros((2, 1, *patch), device="meta"))
    assert tuple(out.shape[-len(shape):]) == tuple(patch)


def test_anisotropic_ct_plan():
    fingerprint = _fake_fingerprint([512, 512, 40], [0.8, 0.8, 5.0])
    plan = plan_experiment(fingerprint)
    params = plan["network"]["params"]
    assert plan["target_spacing"] == pytest.approx([0.8, 0.8, 5.0])
    assert params["strides"][1] == [2, 2, 1] and params["kernel_size"][0] == [3, 3, 1]
    assert plan["patch_size"][2] <= 40


def test_bad_options(iso_dataset):
    fingerprint, _ = compute_fingerprint(iso_dataset, workers=1, progress=False)
    with pytest.raises(ConfigError, match="^model: "):
        plan_experiment(fingerprint, model="vnet")
    with pytest.raises(ConfigError, match="unknown loss 'cldise'"):
        plan_experiment(fingerprint, topology_loss="cldise")
    with pytest.raises(ConfigError, match="not a topology loss"):
        plan_experiment(fingerprint, topology_loss="dice_ce")
    for bad in (0, 0.01, float("inf"), float("nan")):  # inf overflowed the patch search; 0.01 blamed the kernel size
        with pytest.raises(ConfigError, match=r"^gpu_memory_gb: must be 0.5 to 65536 GiB"):
            plan_experiment(fingerprint, gpu_memory_gb=bad)


def test_sauna_is_planned_alone_as_its_paper_trains_it():
    """It was planned beside dice_ce "at the paper's weights"; the paper trains the
    regression alone, with its own tanh output (dice_ce beside it made the head sigmoid)."""
    from medseg.config import validate_config
    from medseg.losses import build_loss
    from medseg.planning.planner import plan_losses

    losses, reasons = plan_losses("sauna", {})
    assert [t["name"] for t in losses] == ["sauna"] and "alone" in reasons[0]
    config = validate_config({"data": {"dataset": "d"}, "train": {"iterations": 1}, "output_dir": "o",
                              "losses": losses})
    assert build_loss(config.losses, 2).output_activation == "tanh"
    assert [t["name"] for t in plan_losses("cldice", {})[0]] == ["dice_ce", "cldice"]


def test_planned_dice_ce_leaves_the_background_out_as_nnunet():
    """Written as "nnU-Net's loss", it took the background's Dice in (MONAI's default),
    where nnU-Net's DC_and_CE_loss has do_bg=False."""
    import torch

    from medseg.losses import build_loss
    from medseg.losses.dice import DiceCELoss
    from medseg.planning.planner import plan_losses

    losses, _ = plan_losses(None, {})
    loss = build_loss(losses, 3)
    logits, label = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 1, 6, 6))
    expected = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False)(logits, label)
    assert torch.allclose(loss(logits, label)[0], expected)


def test_extreme_cases_are_named_and_kept(extreme_dataset):
    fingerprint, _ = compute_fingerprint(extreme_dataset, workers=1, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_experiment(fingerprint)
    messages = [str(w.message) for w in caught if issubclass(w.category, PlanWarning)]
    assert messages == plan["warnings"]
    assert any("'thick_slices'" in m and "10x the median" in m for m in messages), messages
    assert any("'one_slice'" in m and "2D" in m for m in messages), messages
    # kept: every case is in the fingerprint; the 3D plan uses the five 3D cases
    assert len(fingerprint["cases"]) == 6
    assert plan["target_spacing"] == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.slow
def test_planned_config_trains(iso_dataset, tmp_path):
    """Two iterations of medseg train from a planned config (deep supervision, SGD, cldice)."""
    from medseg.training.trainer import run_training

    result = run_plan(iso_dataset, output=tmp_path / "config.yaml", workers=1, progress=False, topology_loss="cldice")
    cfg = load_config(result.config, [
        "train.iterations=2", f"output_dir={tmp_path / 'run'}", "device=cpu", "data.num_workers=0",
        "train.checkpoint_interval=1",
    ])
    run_dir = run_training(cfg)
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 2


def test_preprocessing_takes_statistics_from_the_fingerprint(tmp_path):
    """data.fingerprint (written by plan) replaces the pass of fit_preprocessing; a case file
    changed after planning makes preprocess refuse the fingerprint with one line."""
    import os
    import subprocess
    import sys

    from medseg.data.dataset import check_dataset, split_cases
    from medseg.data.synthetic import make_dataset
    from medseg.planning.fingerprint import load_samples, preprocessing_from_fingerprint
    from medseg.planning.writer import read_fingerprint
    from medseg.preprocessing import run_preprocessing

    dataset = tmp_path / "Dataset805_Ct"
    make_dataset(dataset, cases=3, size=24, dims=3, spacing=(1.0, 1.0, 1.0), test_cases=0, loops=0, seed=3)
    result = run_plan(dataset, output=tmp_path / "plan" / "config.yaml", workers=1, progress=False)
    cfg = load_config(result.config, [f"output_dir={tmp_path / 'run'}", "data.cache_dir=" + str(tmp_path / "cache")])
    assert cfg.data.fingerprint == (tmp_path / "plan" / "fingerprint.json").resolve()
    cached = run_preprocessing(cfg, workers=1)
    info, cases = check_dataset(dataset, "Tr")
    train, _ = split_cases(cases, cfg.data.val_fraction, cfg.seed, cfg.data.split_file, root=dataset)
    expected = preprocessing_from_fingerprint(
        read_fingerprint(cfg.data.fingerprint), load_samples(cfg.data.fingerprint), info, cfg, train
    )
    assert cached.preprocessing == expected

    label = sorted((dataset / "labelsTr").iterdir())[0]  # same bytes, a new modification time
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    proc = subprocess.run(
        [sys.executable, "-m", "medseg", "preprocess", str(result.config), "--set", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "data.fingerprint does not describe the dataset's current files" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_dataset_with_its_own_split_is_planned_with_it(synthetic_dataset_2d_png, tmp_path):
    """TopoMortar ships its published train/val as splits_final.json; the planned config
    drew a seeded split instead and trained on validation images."""
    import shutil

    from medseg.data.dataset import list_cases, read_dataset_json, split_cases

    dataset = tmp_path / "Dataset300_Split"
    shutil.copytree(synthetic_dataset_2d_png, dataset)
    names = sorted(c.name for c in list_cases(dataset, read_dataset_json(dataset)))
    (dataset / "splits_final.json").write_text(json.dumps([{"train": names[1:], "val": names[:1]}]))
    run_plan(dataset, output=tmp_path / "c.yaml", workers=1, progress=False)
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.split_file == dataset / "splits_final.json"
    train, val = split_cases(list_cases(dataset, read_dataset_json(dataset)), cfg.data.val_fraction, cfg.seed,
                             cfg.data.split_file, root=dataset)
    assert [c.name for c in val] == names[:1]
    run_plan(synthetic_dataset_2d_png, output=tmp_path / "d" / "d.yaml", workers=1, progress=False)
    assert load_config(tmp_path / "d" / "d.yaml").data.split_file is None  # no file: the seeded split


def test_files_swapped_by_renaming_make_the_fingerprint_stale_and_older_records_still_compare(tmp_path):
    """Two files of the same size and time swapped with mv kept size and mtime: the plan's
    fingerprint (and the cache's key) took them as unchanged."""
    import os

    from medseg.data.dataset import check_dataset
    from medseg.data.synthetic import make_dataset
    from medseg.planning.fingerprint import _file_stamp, stale_cases

    dataset = tmp_path / "Dataset806_Swap"
    make_dataset(dataset, cases=2, size=16, dims=3, test_cases=0, loops=0, seed=4, file_ending=".nii")
    info, cases = check_dataset(dataset, "Tr")
    a, b = (case.label_file for case in cases)
    assert a.stat().st_size == b.stat().st_size  # uncompressed, same shape
    for path in (a, b):
        os.utime(path, ns=(10**18, 10**18))

    def fingerprint(drop=()):
        return {"cases": {case.name: {"files": [{k: v for k, v in _file_stamp(f, dataset).items() if k not in drop}
                                                for f in [*case.image_files, case.label_file]]} for case in cases}}

    planned, older = fingerprint(), fingerprint(drop=("ctime_ns", "inode"))
    assert stale_cases(planned, info, cases) == [] and stale_cases(older, info, cases) == []
    a.rename(tmp_path / "x")
    b.rename(a)
    (tmp_path / "x").rename(b)
    assert stale_cases(planned, info, cases) == sorted(case.name for case in cases)


def test_a_label_in_no_case_is_named_and_not_counted_as_rare(tmp_path):
    """tumour: 2 declared but in no case: plan said nothing and raised the foreground
    oversampling for it as a rare label, which cannot be sampled."""
    from medseg.data.dataset import write_dataset_json
    from medseg.data.io import ImageGeometry, write_image

    root = tmp_path / "Dataset010_Absent"
    rng = np.random.default_rng(0)
    geometry = ImageGeometry.from_spacing((16, 16, 16), (1.0, 1.0, 1.0))
    for i in range(4):
        write_image(root / "imagesTr" / f"c{i}_0000.nii.gz", rng.normal(size=(16, 16, 16)).astype(np.float32), geometry)
        label = np.zeros((16, 16, 16), np.uint8)
        label[4:12, 6:8, 6:8] = 1
        write_image(root / "labelsTr" / f"c{i}.nii.gz", label, geometry)
    write_dataset_json(root, {0: "MR"}, {"background": 0, "vessel": 1, "tumour": 2}, 4)
    result = run_plan(root, output=tmp_path / "plan" / "config.yaml", workers=1, progress=False)
    assert any("tumour (2)" in w and "appear in no training case" in w for w in result.warnings), result.warnings
    assert "tumour" not in result.plan["foreground_oversample_rule"]
