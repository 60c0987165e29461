"""torchrun on the CPU: 2 gloo processes on loopback against one process.

Each test launches ``torchrun --nproc_per_node 2`` in a subprocess with
``tests/distributed/_worker.py`` (the medseg CLI plus a dump of what is compared) and
compares with the same command run in this process: DDP keeps the ranks' parameters
bitwise identical, a 2-rank run at the same global batch logs the loss curve of one
process, ``--resume`` continues on both ranks, and sharded predict writes the files one
process writes, with a failure on one rank failing every rank.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import medseg.distributed as distributed
from medseg.config import validate_config
from medseg.data.io import read_image, read_image_channels, write_image
from medseg.inference.predict import PROBABILITY_SUFFIX, PROVENANCE, compared_provenance, run_prediction
from medseg.runfolder.checkpoint import load_checkpoint
from medseg.runfolder.lock import LOCK_FILE
from medseg.training.trainer import run_training

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from predict_helpers import blob_image, make_run, oblique_geometry  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_worker.py")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch was built without torch.distributed / gloo",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], dump: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    dump.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MEDSEG_TEST_DUMP": str(dump),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--local_addr", "127.0.0.1",
        str(WORKER), *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _exit_codes(dump: Path, nproc: int = 2) -> list[int]:
    return [int((dump / f"exit_rank{r}.txt").read_text()) for r in range(nproc)]


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_helpers_are_no_ops_in_one_process():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    values = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(values) is values
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.gather_lists(["a"]) == ["a"]
    with pytest.raises(ValueError, match="boom"):
        with distributed.synchronized("a section"):
            raise ValueError("boom")


def _validation_setup():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=0)
    cfg = validate_config({
        "data": {"dataset": "unused", "patch_size": [16, 16, 16]}, "train": {"iterations": 1},
        "inference": {"overlap": 0.25, "sw_batch_size": 2}, "output_dir": "unused",
    })
    generator = torch.Generator().manual_seed(1)
    cases = [
        {"image": torch.randn(1, 20, 18, 16, generator=generator),
         "label": (torch.rand(1, 20, 18, 16, generator=generator) > 0.6).long()}  # class 2 never present
        for _ in range(3)
    ]
    return model, cfg, cases


def _spawned_rank(rank: int, port: int, out: str) -> None:
    """One of 2 processes of torch.multiprocessing.spawn: validation and a failing section."""
    from medseg.errors import MedsegError
    from medseg.training.validation import validate

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    model, cfg, cases = _validation_setup()
    result = {}
    with distributed.process_group(torch.device("cpu")) as joined:
        result["joined"] = joined
        result["three"] = validate(model, cases, cfg, 3, torch.device("cpu"))
        result["one"] = validate(model, cases[:1], cfg, 3, torch.device("cpu"))  # rank 1 validates nothing
        result["sum"] = distributed.all_reduce_sum(torch.tensor([rank + 1.0])).item()
        result["gathered"] = distributed.gather_lists([f"r{rank}"])
        try:
            with distributed.synchronized("a section"):
                if rank == 1:
                    raise ValueError("boom on 1")
        except MedsegError as err:
            result["error"] = f"MedsegError: {err}"
        except ValueError as err:
            result["error"] = f"ValueError: {err}"
    torch.save(result, Path(out) / f"rank{rank}.pt")


def test_collectives_and_sharded_validation_under_spawn(tmp_path):
    from medseg.training.validation import validate

    torch.multiprocessing.spawn(_spawned_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model, cfg, cases = _validation_setup()
    for key, subset in (("three", cases), ("one", cases[:1])):
        want = validate(model, subset, cfg, 3, torch.device("cpu"))
        assert want[1] == 0.0  # a class absent from every reference scores 0, as MONAI's DiceMetric
        for result in results:
            assert result[key] == pytest.approx(want, abs=1e-6), key
    for result in results:
        assert result["joined"] and result["sum"] == 3.0 and result["gathered"] == ["r0", "r1"]
    assert results[0]["error"] == "MedsegError: a section failed on rank 1 (see its error above)"
    assert results[1]["error"] == "ValueError: boom on 1"


# --------------------------------------------------------------------------- training

def _train_raw(dataset: Path, out: Path, iterations: int) -> dict:
    return {
        "data": {
            "dataset": str(dataset),
            "patch_size": [16, 16, 16],
            "val_fraction": 0.34,  # 2 validation cases: one per rank
            "augmentation": {"affine_prob": 0.3, "gaussian_noise_prob": 0.3},
        },
        "model": {"name": "unet", "params": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}},
        "train": {
            "iterations": iterations,
            "batch_size": 4,  # the global batch: 2 patches per rank
            "val_interval": 3,
            "checkpoint_interval": 3,
            "log_interval": 1,  # a metrics row per step: the whole loss curve
            # a constant LR, so that a run extended on --resume follows the reference's schedule
            "scheduler": {"name": "constant"},
        },
        "inference": {"overlap": 0.25, "sw_batch_size": 8},
        "output_dir": str(out),
        "seed": 3,
        "device": "cpu",
    }


def test_two_ranks_train_like_one_process_and_resume(synthetic_dataset_3d, tmp_path):
    reference = run_training(validate_config(_train_raw(synthetic_dataset_3d, tmp_path / "single", iterations=8)))

    run = tmp_path / "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(_train_raw(synthetic_dataset_3d, run, iterations=5)))
    first = _torchrun(["train", str(config)], tmp_path / "dump1")
    assert first.returncode == 0, first.stderr[-4000:]
    # --resume on both ranks from latest.pt (iteration 5), extended to the reference's 8 steps
    second = _torchrun(["train", str(config), "--resume", "--set", "train.iterations=8"], tmp_path / "dump2")
    assert second.returncode == 0, second.stderr[-4000:]

    for dump in (tmp_path / "dump1", tmp_path / "dump2"):
        assert _exit_codes(dump) == [0, 0]
        params = [torch.load(dump / f"params_rank{r}.pt", weights_only=True) for r in range(2)]
        assert params[0].keys() == params[1].keys()
        for key in params[0]:  # DDP: the same gradients, the same steps on every rank
            assert torch.equal(params[0][key], params[1][key]), key
    latest = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert latest["iteration"] == 8
    for key, value in latest["model"].items():  # the unwrapped module: no "module." prefix
        assert torch.equal(value, params[0][key]), key

    # the same global batch gives the single process's loss curve
    got, want = _rows(run), _rows(reference)
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] == [str(i) for i in range(1, 9)]
    for g, w in zip(got, want):
        assert float(g["lr"]) == float(w["lr"])
        assert float(g["loss"]) == pytest.approx(float(w["loss"]), rel=1e-4, abs=1e-6), g["iteration"]
        assert float(g["loss/dice_ce"]) == pytest.approx(float(w["loss/dice_ce"]), rel=1e-4, abs=1e-6)
        if g["val_dice_mean"] and w["val_dice_mean"]:  # validation sharded, Dice sums all-reduced
            assert float(g["val_dice_mean"]) == pytest.approx(float(w["val_dice_mean"]), abs=1e-3)
    assert [r["iteration"] for r in got if r["val_dice_mean"]] == ["3", "5", "6", "8"]  # 5 ended the first run
    # (the parameters themselves are not compared with the reference: Adam turns the float
    # noise of ~0 gradients, e.g. of conv biases before instance norm, into steps of +-lr)

    # rank 0 alone logs and writes
    log_text = (run / "train.log").read_text()
    assert "batch 4, patch 16x16x16, 2 processes of batch 2 (gloo)" in log_text and "resuming" in log_text
    console = first.stdout + first.stderr
    assert "[rank 1]" not in console + second.stdout + second.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "latest.pt"]
    assert console.count("dataset SyntheticVessels3D") == 1  # once, not once per rank


def test_a_global_batch_that_does_not_split_is_refused(synthetic_dataset_3d, tmp_path):
    raw = _train_raw(synthetic_dataset_3d, tmp_path / "odd", iterations=2)
    raw["train"]["batch_size"] = 3
    config = tmp_path / "odd.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = _torchrun(["train", str(config)], tmp_path / "dump")
    assert proc.returncode != 0
    assert _exit_codes(tmp_path / "dump") == [2, 2]  # ConfigError on both ranks
    assert "train.batch_size: 3 is the global batch and must be a multiple of the 2 processes" in proc.stderr
    assert not (tmp_path / "odd").exists()


# --------------------------------------------------------------------------- predict

def test_sharded_predict_writes_the_single_process_files(tmp_path):
    model = make_run(tmp_path / "run")
    scans = tmp_path / "imagesTs"
    for i, name in enumerate(("case_a", "case_b", "case_c", "case_d", "case_e")):
        write_image(scans / f"{name}_0000.nii.gz", blob_image() + i, oblique_geometry())
    broken = scans / "case_d_0000.nii.gz"  # case 3 of 5: rank 1's
    broken.write_bytes(broken.read_bytes()[:200])

    single = tmp_path / "single"
    assert run_prediction(model, [scans], single, save_probabilities=True, device="cpu") is False
    out = tmp_path / "ddp"
    proc = _torchrun(
        ["predict", "--model", str(model), "--input", str(scans), "--output", str(out), "--save-probabilities",
         "--device", "cpu"],
        tmp_path / "dump",
    )
    assert proc.returncode != 0
    assert _exit_codes(tmp_path / "dump") == [1, 1]  # rank 0's cases passed; rank 1's failure fails both
    assert proc.stdout.count("medseg: predicted 4 case(s), skipped 0, failed 1 (case_d)") == 1, proc.stdout
    assert sum("case case_d" in line for line in proc.stderr.splitlines()) == 1

    names = sorted(p.name for p in single.iterdir() if p.name not in (PROVENANCE, LOCK_FILE))
    assert names == sorted(p.name for p in out.iterdir() if p.name not in (PROVENANCE, LOCK_FILE))
    assert len(names) == 8 and "case_d.nii.gz" not in names
    records = [json.loads((folder / PROVENANCE).read_text()) for folder in (single, out)]
    assert compared_provenance(records[0]) == compared_provenance(records[1])  # made_by: another process
    for name in names:
        if name.endswith(PROBABILITY_SUFFIX):
            a, ga = read_image_channels(single / name)
            b, gb = read_image_channels(out / name)
        else:
            a, ga = read_image(single / name)
            b, gb = read_image(out / name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
        assert np.array_equal(ga.affine, gb.affine), name
        assert gzip.decompress((single / name).read_bytes()) == gzip.decompress((out / name).read_bytes()), name

