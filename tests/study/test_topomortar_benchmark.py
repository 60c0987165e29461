"""benchmarks/topomortar.py --quick on the crops of tests/data/topomortar: a smoke test, no timing checked."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from medseg.losses import LOSS_NAMES

REPO = Path(__file__).resolve().parents[2]
CROPS = REPO / "tests" / "data" / "topomortar"


def _load(name: str, path: Path):
    # a script finds its neighbours (benchmarks/_args.py) on sys.path, as when run as a script
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The crops in nnU-Net layout, made by the project's converter (3 train + 2 val images, 160x160)."""
    convert = _load("prepare_topomortar", REPO / "data_scripts" / "prepare_topomortar.py")
    out = tmp_path_factory.mktemp("topomortar") / "Dataset201_TopoMortar"
    convert.prepare_topomortar(CROPS, out, log=lambda message: None)
    return out


def test_quick_run_writes_a_row_per_loss_setting_and_state(dataset, tmp_path, capsys):
    bench = _load("topomortar_benchmark", REPO / "benchmarks" / "topomortar.py")
    out = tmp_path / "topomortar.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--data", str(dataset), "--threads", "1", "--betti-threads", "1", "--loss-scale",
                    "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert "mip" in result["skipped"] and "skipped: mip" in printed
    assert result["failures"] == []
    losses = [n for n in LOSS_NAMES if n != "mip"]
    settings = {s["setting"]: s for s in result["settings"]}
    assert settings["crop"]["shape"] == [128, 128] and settings["crop"]["batch"] == 2
    assert settings["full"]["shape"] == [160, 160] and settings["full"]["batch"] == 2
    states = ("noisy", "partly trained")
    rows = {(r["setting"], r["state"], r["loss"]): r for r in result["rows"]}
    assert set(rows) == {(s, st, n) for s in settings for st in states for n in losses}
    for row in rows.values():
        assert row["seconds"] > 0 and row["network_seconds"] > 0 and row["ratio"] > 0
        # in step: dice_ce + NAME minus dice_ce, paired by round (a difference: its sign is noise for cheap terms)
        assert math.isfinite(row["in_step_seconds"])
        assert row["in_step_ratio"] == pytest.approx(row["in_step_seconds"] / row["network_seconds"])
    assert {(n["setting"], n["state"]) for n in result["network"]} == {(s, st) for s in settings for st in states}
    # the pipeline's targets reach the terms that read them, as in training
    assert rows[("crop", "noisy", "skeleton_recall")]["precomputed"] == ["skeleton"]
    assert rows[("crop", "noisy", "cbdice")]["precomputed"] == ["skeleton_distance"]

    scale = {(r["setting"], r["loss"]): r for r in result["loss_scale"]}
    for setting in settings:
        for state in states:
            pairs = scale[(setting, "betti_matching (pairs)")][state]
            none = scale[(setting, "betti_matching (none)")][state]
            assert 0 <= pairs <= 4 and none >= pairs
            assert scale[(setting, "dice_ce")][f"{state} / dice_ce"] == pytest.approx(1.0)


def test_one_betti_matching_row_per_engine_backend(dataset, tmp_path, capsys):
    """--betti-backends: the term once per backend (on a GPU: cuda against the CPU engine),
    the same loss values from each; an unknown backend is a one-line usage error."""
    bench = _load("topomortar_benchmark", REPO / "benchmarks" / "topomortar.py")
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--data", str(dataset), "--threads", "1", "--betti-threads", "1",
                             "--losses", "betti_matching", "--betti-backends", "cpu,cpu-parallel"])
        with pytest.raises(SystemExit):
            bench.main(["--quick", "--data", str(dataset), "--betti-backends", "cpu,gpu"])
    finally:
        torch.set_num_threads(threads)
    assert "--betti-backends: unknown backend gpu" in capsys.readouterr().err
    rows = {(r["setting"], r["state"], r["loss"]): r for r in result["rows"]}
    keys = {"betti_matching[cpu]", "betti_matching[cpu-parallel]"}
    assert {loss for *_, loss in rows} == keys
    for setting in ("crop", "full"):
        for state in ("noisy", "partly trained"):
            cpu, parallel = (rows[(setting, state, k)]["value"] for k in sorted(keys))
            assert cpu == pytest.approx(parallel, rel=1e-6) and cpu > 0


def test_deep_supervision_times_each_term_on_the_final_head_and_on_all_heads(dataset, tmp_path):
    """A DynUNet with deep supervision: a second row per term over every head (heads: all),
    whose value is deep_supervision_loss's weighted sum of the per-head values."""
    import yaml

    config = tmp_path / "dynunet_small.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "dynunet", "params": {
        "filters": [4, 8, 8, 16, 16, 16, 16, 16], "deep_supervision": True, "deep_supr_num": 1}}}))
    bench = _load("topomortar_benchmark", REPO / "benchmarks" / "topomortar.py")
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--data", str(dataset), "--threads", "1", "--betti-threads", "1",
                             "--model-config", str(config), "--losses", "betti_matching,cldice"])
    finally:
        torch.set_num_threads(threads)
    assert result["failures"] == []
    rows = {(r["setting"], r["state"], r["loss"]): r for r in result["rows"]}
    for setting in ("crop", "full"):
        for state in ("noisy", "partly trained"):
            for name in ("betti_matching", "cldice"):
                final, every = rows[(setting, state, name)], rows[(setting, state, f"{name} (all 2 heads)")]
                assert (final["heads"], every["heads"]) == ("final", "all")
                assert every["seconds"] > 0 and every["value"] > 0
            # the stand-in logits sit on both heads: the weighted sum equals the final head's value
            if state == "partly trained":
                assert rows[(setting, state, "cldice (all 2 heads)")]["value"] == pytest.approx(
                    rows[(setting, state, "cldice")]["value"], rel=1e-5)


@pytest.mark.parametrize("name", ["topomortar_study.yaml", "topomortar_cpu.yaml"])
def test_the_benchmark_studies_load(name, dataset, tmp_path):
    """The shipped TopoMortar studies resolve into valid runs (a copy, output elsewhere)."""
    import yaml

    from medseg.study.config import load_study

    raw = yaml.safe_load((REPO / "benchmarks" / name).read_text())
    raw["base"], raw["output_dir"] = str(REPO / raw["base"]), str(tmp_path / "out")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    study = load_study(path, [f"data.dataset={dataset}"])
    assert len(study.runs) == len(raw["variants"]) * len(raw["seeds"]) and study.baseline == "cedice"
    losses = {run.variant: {t.name: t for t in run.config.losses} for run in study.runs}
    assert {"cldice", "skeleton_recall", "cbdice", "clce"} <= {n for terms in losses.values() for n in terms}
    matching = [terms["betti_matching"] for terms in losses.values() if "betti_matching" in terms]
    assert matching and all(t.normalize == "voxels" and t.start == 0.25 for t in matching)  # the validated setting


def test_the_protocol_network_comes_from_the_study():
    bench = _load("topomortar_benchmark", REPO / "benchmarks" / "topomortar.py")
    cfg = bench.model_config(REPO / "benchmarks" / "topomortar_study.yaml")
    assert cfg.name == "dynunet" and cfg.params["filters"] == [32, 64, 128, 256, 512, 512, 512]
    assert cfg.params["deep_supervision"] is True  # from configs/dynunet.yaml, the study's base


def test_adaptation_targets_link_the_images_and_leave_the_dataset_alone(dataset, tmp_path):
    """adaptation_topomortar.py: 'train' adapts on the split's training images and scores on the test set;
    an out-of-distribution group on its own images; an old workdir (imagesTs linked as a folder) is migrated."""
    bench = _load("adaptation_topomortar", REPO / "benchmarks" / "adaptation_topomortar.py")
    before = sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*"))
    split = json.loads((dataset / "splits_final.json").read_text())[0]["train"]

    folder, images, labels = bench.target_dataset(dataset, "train", tmp_path)
    linked = sorted(folder.joinpath("imagesTs").iterdir())
    assert [p.name for p in linked] == sorted(f"{case}_0000.png" for case in split)
    assert all(p.is_symlink() and p.resolve().parent == (dataset / "imagesTr").resolve() for p in linked)
    assert (images, labels) == (dataset / "imagesTs", dataset / "labelsTs")

    group = next(p.name[len("imagesTs_"):] for p in dataset.glob("imagesTs_*"))
    old = tmp_path / "targets" / group
    old.mkdir(parents=True)
    (old / "imagesTs").symlink_to((dataset / f"imagesTs_{group}").resolve(), target_is_directory=True)
    folder, images, labels = bench.target_dataset(dataset, group, tmp_path)
    assert not (folder / "imagesTs").is_symlink()
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == sorted(p.name for p in images.iterdir())
    assert labels == dataset / f"labelsTs_{group}"
    assert sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*")) == before  # nothing written into it
    with pytest.raises(SystemExit, match="nowhere"):
        bench.target_dataset(dataset, "nowhere", tmp_path)


def test_deep_supervision_heads_benchmark_compares_the_two_ways(dataset, tmp_path):
    """benchmarks/deep_supervision_heads.py: both ways timed, the same value (a smoke test)."""
    import yaml

    config = tmp_path / "dynunet_small.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "dynunet", "params": {
        "filters": [4, 8, 8, 16, 16, 16, 16, 16], "deep_supervision": True, "deep_supr_num": 2}}}))
    bench = _load("deep_supervision_heads", REPO / "benchmarks" / "deep_supervision_heads.py")
    result = bench.main(["--data", str(dataset), "--model-config", str(config), "--images", "2", "--crop-batch", "2",
                         "--crop-size", "96", "--repeats", "1"])
    for setting in ("crop", "full"):
        assert result[setting]["same_value"] and result[setting]["per_head"] > 0 and result[setting]["at_once"] > 0
