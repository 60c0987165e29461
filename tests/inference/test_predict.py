"""medseg predict: geometry restored exactly, resume/overwrite, bad cases reported, TTA."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from medseg.data.dataset import Case, DatasetInfo, load_case
from medseg.data.io import ImageGeometry, read_image, read_image_channels, write_image
from medseg.errors import CheckpointError, DataError, MedsegError
from medseg.inference.predict import run_prediction
from medseg.inference.predictor import Predictor
from medseg.runfolder.lock import LOCK_FILE

from predict_helpers import Threshold, blob_image, make_run, oblique_geometry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _predict(run, scans, out, **kw):
    options = dict(overwrite=False, tta=None, overlap=None, sw_batch_size=None, save_probabilities=False, device="cpu")
    options.update(kw)
    return run_prediction(model=run, inputs=[scans], output=out, **options)


def test_outputs_keep_input_shape_and_affine(tiny_run, scans, tmp_path):
    out = tmp_path / "pred"
    assert _predict(tiny_run, scans, out, save_probabilities=True)
    for name in ("case_a", "case_b", "case_c"):
        image, geometry = read_image(scans / f"{name}_0000.nii.gz")
        seg, seg_geometry = read_image(out / f"{name}.nii.gz")
        assert seg.shape == image.shape == (21, 17, 11)
        assert np.allclose(seg_geometry.affine, geometry.affine, atol=1e-5)
        assert seg.dtype.kind in "iu" and set(np.unique(seg)) <= {0, 1}
        prob, prob_geometry = read_image_channels(out / f"{name}_prob.nii.gz")
        assert prob.shape == (2, *image.shape)
        # class maps are stitched in float16: each within 1.2e-4 of float32 (sliding_window.py)
        assert np.allclose(prob.sum(0), 1, atol=3e-4)
        assert np.allclose(prob_geometry.affine, geometry.affine, atol=1e-5)
        assert np.array_equal(prob.argmax(0), seg)


def _threshold_predictor(run):
    predictor = Predictor.from_path(run, device="cpu")
    predictor.model = Threshold()
    return predictor


def _load(path):
    info = DatasetInfo(root=path.parent, name="t", channel_names={0: "MR"}, labels={"background": 0, "vessel": 1},
                       file_ending=".nii.gz", num_training=0)
    return load_case(Case(name="x", image_files=[path]), info)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("tta", [False, True])
def test_resampled_prediction_lands_on_the_right_voxels(tiny_run, tmp_path, tta):
    # Off-centre blob on an oblique, anisotropic grid; the run resamples to 1.5 mm isotropic
    # in RAS orientation. A model that thresholds intensity must reproduce the blob on the
    # original grid, which fails if the inverse transforms were wrong (flips, axis swaps, shifts).
    image = blob_image(centre=(6.0, 5.0, 3.0))
    path = tmp_path / "blob_0000.nii.gz"
    write_image(path, image, oblique_geometry())
    case = _load(path)
    label, prob = _threshold_predictor(tiny_run).predict_case(case, tta=tta)
    assert label.shape == image.shape
    normalised = (image - image.mean()) / image.std()
    expected = normalised > 0
    assert _dice(label > 0, expected) > 0.9
    assert _dice(label > 0, expected[::-1]) < 0.6  # a flipped answer would be caught


def test_tta_averages_flips(tiny_run, scans):
    predictor = Predictor.from_path(tiny_run, device="cpu")
    case = _load(scans / "case_a_0000.nii.gz")
    _, plain = predictor.predict_case(case, tta=False)
    _, mirrored = predictor.predict_case(case, tta=True)
    assert mirrored.shape == plain.shape
    assert not np.allclose(plain, mirrored)  # the random net is not flip-equivariant
    # A flip-equivariant model gives the same probabilities with and without TTA.
    predictor.model = Threshold()
    _, a = predictor.predict_case(case, tta=False)
    _, b = predictor.predict_case(case, tta=True)
    assert np.allclose(a, b, atol=1e-5)


def test_existing_outputs_are_skipped_unless_overwrite(tiny_run, scans, tmp_path, capsys):
    out = tmp_path / "pred"
    assert _predict(tiny_run, scans, out)
    marker = np.full((21, 17, 11), 7, np.uint8)
    write_image(out / "case_a.nii.gz", marker, oblique_geometry())
    capsys.readouterr()
    assert _predict(tiny_run, scans, out)
    assert "3 case(s) already predicted" in capsys.readouterr().err
    assert (read_image(out / "case_a.nii.gz")[0] == 7).all()  # skipped: untouched
    assert _predict(tiny_run, scans, out, overwrite=True)
    assert set(np.unique(read_image(out / "case_a.nii.gz")[0])) <= {0, 1}


def test_bad_case_is_reported_and_the_batch_goes_on(tiny_run, scans, tmp_path, capsys):
    out = tmp_path / "pred"
    assert _predict(tiny_run, scans, out)
    before = (out / "case_b.nii.gz").read_bytes()
    data = (scans / "case_b_0000.nii.gz").read_bytes()
    (scans / "case_b_0000.nii.gz").write_bytes(data[: len(data) // 2])
    nan_image = blob_image()
    nan_image[3, 3, 3] = np.nan
    write_image(scans / "case_d_0000.nii.gz", nan_image, oblique_geometry())
    capsys.readouterr()
    assert _predict(tiny_run, scans, out, overwrite=True) is False
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "case_b" in ln]
    assert len(lines) == 1 and "truncated" in lines[0] and "case_b_0000.nii.gz" in lines[0]
    assert any("case_d" in ln and "NaN" in ln for ln in err.splitlines())
    assert "Traceback" not in err
    assert (out / "case_b.nii.gz").read_bytes() == before  # the earlier output is not damaged
    assert not (out / "case_d.nii.gz").exists()
    for name in ("case_a", "case_c"):
        assert read_image(out / f"{name}.nii.gz")[0].shape == (21, 17, 11)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]  # no temporary leftovers


def test_2d_png_inputs(tmp_path):
    run = make_run(tmp_path / "run2d", patch=(16, 16), target_spacing=(0.7, 0.7))
    scans = tmp_path / "png"
    rng = np.random.default_rng(0)
    write_image(scans / "img_0000.png", rng.integers(0, 255, (23, 30)).astype(np.uint8), ImageGeometry.identity((23, 30)))
    assert run_prediction(run, [scans], tmp_path / "out", False, None, None, None, True, "cpu")
    seg, geometry = read_image(tmp_path / "out" / "img.png")
    assert seg.shape == (23, 30)
    prob, _ = read_image_channels(tmp_path / "out" / "img_prob.nii.gz")
    assert prob.shape == (2, 23, 30)


def test_multichannel_cases_and_missing_channel(tmp_path):
    run = make_run(tmp_path / "run", channels=("T1", "T2"), labels={"background": 0, "a": 1, "b": 2})
    scans = tmp_path / "in"
    geometry = oblique_geometry()
    for name in ("x", "y"):
        for c in range(2):
            write_image(scans / f"{name}_{c:04d}.nii.gz", blob_image() * (c + 1), geometry)
    assert run_prediction(run, [scans], tmp_path / "out", False, True, 0.25, 1, False, "cpu")
    seg, _ = read_image(tmp_path / "out" / "x.nii.gz")
    assert seg.shape == (21, 17, 11) and seg.max() <= 2
    (scans / "y_0001.nii.gz").unlink()
    with pytest.raises(DataError, match="y_0001.nii.gz"):  # no case left: one line, nothing predicted
        run_prediction(run, [tmp_path / "in" / "y_0000.nii.gz"], tmp_path / "out2", False, None, None, None, False,
                       "cpu")


def test_a_case_whose_files_form_none_is_reported_and_the_others_are_predicted(tmp_path, capsys):
    """One case without its _0001 file (or a name two files share) stopped the whole
    folder with exit 3 and nothing predicted; the README promises a failing case is
    reported and the batch goes on (exit 1)."""
    run = make_run(tmp_path / "run", channels=("T1", "T2"), labels={"background": 0, "a": 1, "b": 2})
    scans = tmp_path / "in"
    geometry = oblique_geometry()
    for name, channels in (("good", (0, 1)), ("lonely", (0,)), ("dup", (0, 1))):
        for c in channels:
            write_image(scans / f"{name}_{c:04d}.nii.gz", blob_image() * (c + 1), geometry)
    write_image(scans / "dup_0000.nii", blob_image(), geometry)
    write_image(scans / "dup_0001.nii", blob_image(), geometry)
    assert not run_prediction(run, [scans], tmp_path / "out", False, None, None, None, False, "cpu")
    err = capsys.readouterr()
    assert "lonely_0001" in err.err and "channel 0 of case 'dup' is also given by" in err.err
    assert "predicted 1 case(s), skipped 0, failed 2 (2 input problem(s) above)" in err.out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["good.nii.gz"]


def test_bad_options(tiny_run, scans, tmp_path):
    with pytest.raises(MedsegError, match=r"^overlap=1\.5: "):
        _predict(tiny_run, scans, tmp_path / "o", overlap=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(MedsegError, match="CUDA is not available"):
            _predict(tiny_run, scans, tmp_path / "o", device="cuda")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        _predict(tmp_path, scans, tmp_path / "o")


def test_cli_model_folder_without_checkpoint(tmp_path, scans):
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "medseg", "predict", "--model", str(empty_run), "--input", str(scans),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(empty_run) in lines[0] and "checkpoint" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_scans_of_the_wrong_dimension_are_refused_up_front_or_fail_as_cases(tmp_path, scans, capsys):
    """No input of the model's dimension: refused before the output folder is made (it
    held only its record); some: the others fail as cases and the batch goes on."""
    run = make_run(tmp_path / "run2d", patch=(16, 16), target_spacing=(0.7, 0.7))
    with pytest.raises(DataError, match=r"case_a_0000.nii.gz: 3D image, but the model was trained on 2D "
                                        r"patches \(and no input is 2D\)"):
        run_prediction(run, [scans], tmp_path / "out", False, None, None, None, False, "cpu")
    assert not (tmp_path / "out").exists()
    mixed = tmp_path / "mixed"
    shutil.copytree(scans, mixed)
    write_image(mixed / "flat_0000.nii.gz", blob_image()[:, :, 5], ImageGeometry.identity((21, 17)))
    assert run_prediction(run, [mixed], tmp_path / "out", False, None, None, None, False, "cpu") is False
    err = capsys.readouterr().err
    assert "case_a_0000.nii.gz: 3D image, but the model was trained on 2D patches" in err
    assert "Traceback" not in err
    assert read_image(tmp_path / "out" / "flat.nii.gz")[0].shape == (21, 17)
    coronal = tmp_path / "coronal"  # a slice cut as X×1×Z: said how to store it
    write_image(coronal / "cor_0000.nii.gz", blob_image()[:, 3:4, :], ImageGeometry.identity((21, 1, 11)))
    with pytest.raises(DataError, match=r"a single slice stored 21×1×11: medseg reads a slice as 2D when its thin "
                                        r"axis is the last, X×Y×1"):
        run_prediction(run, [coronal], tmp_path / "out3", False, None, None, None, False, "cpu")


def test_sauna_only_model_saves_tanh_class_maps(tmp_path, scans):
    """A model trained by SAUNA regression alone emits tanh maps: saved as (1 + tanh) / 2."""

    class Regression(torch.nn.Module):  # two one-vs-rest regression channels
        def forward(self, x):
            return torch.cat([0.5 - x[:, :1], x[:, :1]], dim=1) * 2

    run = make_run(tmp_path / "sauna_run", losses=[{"name": "sauna", "weight": 1.0}])
    predictor = Predictor.from_path(run, device="cpu")
    predictor.model = Regression()
    assert predictor.output_activation == "tanh"
    assert Predictor.from_path(make_run(tmp_path / "ce_run"), device="cpu").output_activation == "softmax"
    case = _load(scans / "case_a_0000.nii.gz")
    pre = predictor.preprocess(case)
    maps = predictor.probabilities(pre["image"], tta=False)
    logits = Regression()(pre["image"].as_tensor().unsqueeze(0).float())[0]
    assert torch.allclose(maps, (1 + torch.tanh(logits)) / 2, atol=1e-5)
    assert not torch.allclose(maps, torch.softmax(logits, dim=0), atol=1e-2)
    seg, prob = predictor.predict_case(case, tta=False)
    assert np.array_equal(prob.argmax(0), seg)
    assert prob.min() >= 0 and prob.max() <= 1


def test_a_second_prediction_into_the_same_output_is_refused(tiny_run, scans, tmp_path, capsys):
    """Two predictions at once into one --output (another with --tta --overwrite) both
    exited 0 and left outputs of both under one record."""
    from medseg.cli import main
    from medseg.runfolder.lock import RunFolderLock

    out = tmp_path / "out"
    with RunFolderLock(out, "--output") as running:  # what another medseg predict holds
        running.take()
        code = main(["predict", "--model", str(tiny_run), "--input", str(scans), "--output", str(out), "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert sorted(p.name for p in out.iterdir()) == [".medseg.lock"]  # nothing written
    assert code != 0 and len(err) == 1 and f"--output {out}: in use by another medseg process" in err[0]
    assert _predict(tiny_run, scans, out)  # once it is free


def test_a_case_that_may_not_fit_in_memory_is_named_before_it_is_predicted(tiny_run, scans, tmp_path, capsys,
                                                                             monkeypatch):
    """The out-of-memory killer ends predict without a word: the line before says which
    case needs how much, against the memory of the machine (or container, or job)."""
    import medseg.memory as memory
    from medseg.inference.predict import case_memory_bytes

    assert case_memory_bytes(1000, 500, channels=1, classes=2) == 3 * 4 * 1000  # README's 3x float32
    assert case_memory_bytes(1000, 2000, channels=2, classes=4) == 4 * 2000 * 5
    monkeypatch.setattr(memory, "resident_bytes", lambda: 2**30)
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: int(2**30 / 0.9) + 1000)  # room for a 1 kB case
    assert _predict(tiny_run, scans, tmp_path / "pred")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 3  # case_a, case_b, case_c: 21x17x11 scans, each about 47 kB here
    assert warnings[0].startswith("medseg: warning: case case_a needs about 0.0 GB (") and "1.0 GB this command" in warnings[0]
    assert "the kernel may stop the command (a rerun skips the cases written)" in warnings[0]
    assert all((tmp_path / "pred" / f"case_{c}.nii.gz").is_file() for c in "abc")  # a warning, not a refusal
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: 2**34)
    assert _predict(tiny_run, scans, tmp_path / "again")
    assert "warning" not in capsys.readouterr().err


def test_inputs_of_which_none_has_the_models_channels_are_refused_up_front(tmp_path, capsys):
    """A folder of label maps given to an RGB model failed case by case, one line each (50
    lines for TopoMortar's labelsTs), and left an output folder holding only its record."""
    run = make_run(tmp_path / "rgb", patch=(16, 16), target_spacing=(1.0, 1.0), channels=("R", "G", "B"))
    grey = tmp_path / "grey"
    for name in ("a", "b"):
        write_image(grey / f"{name}.png", np.zeros((20, 24), np.uint8), ImageGeometry.identity((20, 24)))
    with pytest.raises(DataError, match=r"a.png: 1 channel\(s\), but the model was trained on 3 \(and no input has 3\)"):
        run_prediction(run, [grey], tmp_path / "out", False, None, None, None, False, "cpu")
    assert not (tmp_path / "out").exists()
    rgb = np.zeros((20, 24, 3), np.uint8)
    from PIL import Image

    Image.fromarray(rgb).save(grey / "c.png")  # one fits: the others fail as cases, the batch goes on
    assert run_prediction(run, [grey], tmp_path / "out", False, None, None, None, False, "cpu") is False
    assert (tmp_path / "out" / "c.png").is_file()


def test_a_link_at_the_staging_folders_name_is_not_written_through(tiny_run, scans, tmp_path):
    """OUTPUT/.predict.HOST-PID.tmp is a predictable name: another user's link there to a
    folder of theirs had the masks written into it, replacing their files of those names."""
    from medseg.atomic import temporary_name

    victim = tmp_path / "theirs"
    victim.mkdir()
    (victim / "case_a.nii.gz").write_text("precious")
    out = tmp_path / "pred"
    out.mkdir()
    temporary_name(out / "predict").symlink_to(victim)
    assert _predict(tiny_run, scans, out)
    assert (victim / "case_a.nii.gz").read_text() == "precious"
    assert sorted(p.name for p in victim.iterdir()) == ["case_a.nii.gz"]
    assert read_image(out / "case_a.nii.gz")[0].shape == (21, 17, 11)


def test_a_case_named_like_anothers_probability_file_is_refused_before_any_work(tiny_run, tmp_path):
    """scan's probabilities and scan_prob's mask are both scan_prob.nii.gz: the last
    written replaced the other, exit 0, and a rerun skipped scan as finished."""
    folder = tmp_path / "scans"
    for name in ("scan", "scan_prob"):
        write_image(folder / f"{name}_0000.nii.gz", blob_image(), oblique_geometry())
    out = tmp_path / "pred"
    with pytest.raises(DataError, match=r"case 'scan''s probabilities and case 'scan_prob''s mask would both be"):
        _predict(tiny_run, folder, out, save_probabilities=True)
    assert not out.exists() or not any(out.glob("*.nii.gz"))
    assert _predict(tiny_run, folder, out)  # without probabilities no name is shared
