#!/usr/bin/env python
"""Convert the TopoMortar dataset (as published) into the nnU-Net v2 layout medseg reads.

    python data_scripts/prepare_topomortar.py --src ../shared/datasets/TopoMortar \\
        --out data/Dataset201_TopoMortar [--labels accurate|noisy|pseudo]

TopoMortar (Valverde et al., BMVC 2025, arXiv:2503.03365; MIT licence) holds 512x512 RGB
photographs of brick walls with masks of the mortar (0/255 PNGs): ``train/`` (50) and
``val/`` (20) with ``images/`` and three kinds of labels (``accurate/`` manual,
``noisy/`` quick, ``pseudo/`` automatic), ``test/images`` + ``test/accurate`` grouped by
``dataset_types.txt`` (in-distribution, and out-of-distribution groups such as
``colors`` and ``shadows``). The output::

    dataset.json             channels R, G, B (one RGB file per case); labels background 0, mortar 1
    imagesTr/001_0000.png    the 50 train + 20 val photographs, copied byte for byte
    labelsTr/001.png         0/1 masks of the chosen --labels kind (train and val alike)
    splits_final.json        nnU-Net's list of folds, one fold: train = train/ (50), val = val/ (20)
    splits_small.json        the "small" setting (splits_small.yaml: 10 train, 20 val), when present
    imagesVal/ labelsVal/    the 20 validation cases again, as a test folder for choosing
                             settings without touching the test set (labels as labelsTr)
    imagesTs/  labelsTs/     the in-distribution test images, accurate labels
    imagesTs_GROUP/ labelsTs_GROUP/   each out-of-distribution group present (colors, shadows, ...)
    LICENSE                  the dataset's licence

Case names are TopoMortar's image IDs (``001``), so results map back to its files and
to ``betti_numbers.csv``. Masks are binarised at 128 (foreground where value >= 128);
one published mask has a few stray grey values. Train with
``data.split_file: splits_final.json``. The folder appears complete or not at all (it
is built next to --out and renamed).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

try:
    import medseg  # noqa: F401
except ImportError:  # running from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from medseg.data.dataset import write_dataset_json  # noqa: E402
from medseg.data.io import ImageGeometry, write_image  # noqa: E402
from medseg.data.prepare.output import check_dataset_output  # noqa: E402
from medseg.data.prepare.verify import publish_dataset, temporary_dataset  # noqa: E402
from medseg.data.prepare.script import finish  # noqa: E402
from medseg.errors import DataError  # noqa: E402

PROG = "prepare_topomortar.py"
LABEL_KINDS = ("accurate", "noisy", "pseudo")
THRESHOLD = 128  # foreground where the mask value is >= 128
IN_DISTRIBUTION = "indistr"  # the group name dataset_types.txt gives the in-distribution images
TEST_LABELS = "accurate"  # test sets are always scored against the manual labels
SPLIT_FILES = {"splits_small.yaml": "splits_small.json"}  # published settings besides train/ vs val/


def _pngs(folder: Path) -> dict[str, Path]:
    """``{ID: path}`` of the PNG files of a folder."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (is --src the TopoMortar folder?)")
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() == ".png"}
    if not found:
        raise DataError(f"{folder}: no PNG images")
    return found


def _groups(src: Path) -> dict[str, str]:
    """``{ID: group}`` from ``dataset_types.txt`` (``ID,group`` rows)."""
    path = src / "dataset_types.txt"
    if not path.is_file():
        raise DataError(f"{path}: not found (it names the group of each test image)")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0][:2]] != ["ID", "group"]:
        raise DataError(f"{path}: expected a header 'ID,group'")
    groups = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}: line {line}: expected 'ID,group'")
        groups[row[0].strip()] = row[1].strip()
    return groups


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "1", "I;16", "I"):
                raise DataError(f"{path}: expected a grey mask, got PIL mode {img.mode}")
            data = np.asarray(img)
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for bad files
        raise DataError(f"{path}: unreadable mask ({type(err).__name__}: {err})") from None
    if data.shape != shape:
        raise DataError(f"{path}: mask size {data.shape} differs from its image's {shape}")
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    return (data >= THRESHOLD).astype(np.uint8)


def _copy_image(src: Path, dst: Path) -> tuple[int, int]:
    """The RGB photograph as ``dst`` (bytes copied unchanged); returns its (rows, cols)."""
    from PIL import Image

    try:
        with Image.open(src) as img:
            mode, (width, height) = img.mode, img.size
            if mode != "RGB":  # not so in the published data; keep the layout uniform anyway
                img.convert("RGB").save(dst, format="PNG")
    except Exception as err:
        raise DataError(f"{src}: unreadable image ({type(err).__name__}: {err})") from None
    if mode == "RGB":
        shutil.copyfile(src, dst)
    return height, width


def _write_case(case: str, image: Path, mask: Path, images_dir: Path, labels_dir: Path) -> None:
    shape = _copy_image(image, images_dir / f"{case}_0000.png")
    label = _read_mask(mask, shape)
    write_image(labels_dir / f"{case}.png", label, ImageGeometry.identity(label.shape))


def _split_ids(path: Path, held: set[str], log) -> dict[str, list[str]] | None:
    """``{"train": [...], "val": [...]}`` of a published split file, restricted to the cases held."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
        fold = data[next(iter(data))]  # {1: {train: [...], val: [...], test: [...]}}
        split = {part: [Path(entry).stem for entry in fold[part]] for part in ("train", "val")}
    except Exception:
        raise DataError(f"{path}: expected {{fold: {{train: [...], val: [...]}}}} with image paths") from None
    dropped = sum(1 for ids in split.values() for i in ids if i not in held)
    if dropped:
        log(f"{path.name}: {dropped} image(s) not in --src left out")
    return {part: [i for i in ids if i in held] for part, ids in split.items()}


def prepare_topomortar(src: Path, out: Path, labels: str = "accurate", overwrite: bool = False, log=print) -> dict:
    """Build the dataset folder ``out`` from the TopoMortar folder ``src``; returns a summary.

    Raises
    ------
    DataError
        A missing folder or file of ``src`` (named), an image without its mask, a test
        image whose group ``dataset_types.txt`` does not give, an unreadable file, or an
        existing ``out`` without ``overwrite``.
    """
    if labels not in LABEL_KINDS:
        raise DataError(f"--labels {labels!r}: choose from {', '.join(LABEL_KINDS)}")
    if not src.is_dir():
        raise DataError(f"--src {src}: " + ("is not a folder" if src.exists() else "folder not found"))
    check_dataset_output(out, overwrite, {"--src": src})

    # Everything is listed and checked before anything is written.
    training: dict[str, list[tuple[str, Path, Path]]] = {}
    for part in ("train", "val"):
        images = _pngs(src / part / "images")
        masks = _pngs(src / part / labels)
        missing = sorted(set(images) - set(masks))
        if missing:
            raise DataError(f"{src / part / labels / (missing[0] + '.png')}: missing {labels} label of image {missing[0]}")
        training[part] = [(case, images[case], masks[case]) for case in images]
    clash = sorted({c for c, _, _ in training["train"]} & {c for c, _, _ in training["val"]})
    if clash:
        raise DataError(f"{src}: image ID {clash[0]} is in both train/ and val/")
    groups = _groups(src)
    test_images = _pngs(src / "test" / "images")
    test_masks = _pngs(src / "test" / TEST_LABELS)
    tests: dict[str, list[tuple[str, Path, Path]]] = {}
    for case, image in test_images.items():
        if case not in groups:
            raise DataError(f"{image}: image ID {case} has no group in {src / 'dataset_types.txt'}")
        if case not in test_masks:
            raise DataError(f"{src / 'test' / TEST_LABELS / (case + '.png')}: missing label of test image {case}")
        group = groups[case]
        folder = "Ts" if group == IN_DISTRIBUTION else f"Ts_{group}"
        tests.setdefault(folder, []).append((case, image, test_masks[case]))
    absent = sorted(set(groups.values()) - {IN_DISTRIBUTION} - {f[3:] for f in tests})
    if absent:
        log(f"test groups without images in --src (left out): {', '.join(absent)}")

    tmp = temporary_dataset(out)
    try:
        for folder, items in [("Tr", training["train"] + training["val"]), ("Val", training["val"]),
                              *sorted(tests.items())]:
            (tmp / f"images{folder}").mkdir(parents=True)
            for case, image, mask in items:
                _write_case(case, image, mask, tmp / f"images{folder}", tmp / f"labels{folder}")
        train_ids = [c for c, _, _ in training["train"]]
        val_ids = [c for c, _, _ in training["val"]]
        (tmp / "splits_final.json").write_text(json.dumps([{"train": train_ids, "val": val_ids}], indent=2) + "\n")
        held = set(train_ids) | set(val_ids)
        for name, target in SPLIT_FILES.items():
            if (src / name).is_file():
                split = _split_ids(src / name, held, log)
                (tmp / target).write_text(json.dumps([split], indent=2) + "\n")
        if (src / "LICENSE").is_file():
            shutil.copyfile(src / "LICENSE", tmp / "LICENSE")
        test_sets = {f"images{folder}": f"labels{folder}" for folder in sorted(tests)}
        write_dataset_json(
            tmp,
            channel_names={0: "R", 1: "G", 2: "B"},
            labels={"background": 0, "mortar": 1},
            num_training=len(train_ids) + len(val_ids),
            file_ending=".png",
            name=out.name,
            description=f"TopoMortar, {labels} training labels; test sets: "
            + ", ".join(f"images{f} ({len(items)})" for f, items in sorted(tests.items())),
            reference="J. M. Valverde, M. Koga, N. Otsuka, A. B. Dahl: TopoMortar, BMVC 2025, arXiv:2503.03365",
            licence="MIT (see LICENSE)",
            training_labels=labels,
            test_sets=test_sets,
            converted_from=f"{src} (medseg data_scripts/{PROG})",
        )
        publish_dataset(tmp, out, log)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    summary = {"train": len(train_ids), "val": len(val_ids), **{f"images{f}": len(v) for f, v in sorted(tests.items())}}
    log(f"{out}: " + ", ".join(f"{k} {v}" for k, v in summary.items()) + f" ({labels} training labels)")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--src", type=Path, required=True, help="the TopoMortar folder (train/, val/, test/, dataset_types.txt)")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create, e.g. data/Dataset201_TopoMortar")
    parser.add_argument("--labels", choices=LABEL_KINDS, default="accurate", help="training (and validation) labels")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[{PROG}] {message}", file=sys.stderr)

    def work() -> Path:
        prepare_topomortar(args.src, args.out, labels=args.labels, overwrite=args.force, log=log)
        return args.out

    return finish(PROG, work, f"{args.out} is as it was")


if __name__ == "__main__":
    sys.exit(main())
