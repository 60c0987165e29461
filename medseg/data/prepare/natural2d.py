"""Folders of 2D images and masks (PNG, TIFF, ...) -> nnU-Net v2 dataset of 2D images.

Retinal vessel sets (DRIVE, CHASE_DB1, STARE), TopoMortar-style crack images and most
2D benchmarks ship as two folders: images and masks whose names share a stem. Pairs are
matched by *key*: the file name without its ending and without ``image_suffix`` /
``mask_suffix`` (DRIVE: ``21_training.tif`` + ``21_manual1.gif`` match with
``--image-suffix _training --mask-suffix _manual1``; CHASE_DB1: ``Image_01L.jpg`` +
``Image_01L_1stHO.png`` with ``--mask-suffix _1stHO``). Files on one side only are
reported and skipped.

Output (``file_ending`` ``.png``, or ``.tif`` for images that PNG cannot hold: floats,
more than 16 bits)::

    imagesTr/KEY_0000.png [KEY_0001.png KEY_0002.png]   # grey: 1 channel; RGB: 3 (R, G, B)
    labelsTr/KEY.png                                     # integer labels, 0 = background
    dataset.json

Masks: with ``foreground_threshold`` T, a pixel is foreground (1) when its grey value is
greater than T (for masks saved as JPEG or anti-aliased). Without it the grey values are
the labels, except that a mask using only 0 and the maximum of its type (255 or 65535,
how binary masks are usually saved) becomes 0/1. A palette mask (GIF) gives its grey
values when the palette is grey and its palette indices otherwise. An alpha channel is dropped when it is
fully opaque and refused otherwise; colour-coded RGB masks are refused (convert them to
indexed labels first).

EXIF orientation: a camera's JPEG stores its pixels as the sensor read them and says in
its EXIF ``Orientation`` tag how to turn them upright; viewers and annotation tools show
them turned, so masks are drawn on the turned image. With ``exif="apply"`` (the default)
every image and mask read through PIL is turned as its tag says (``PIL.ImageOps.exif_transpose``)
and the turned images are named in one line; ``exif="ignore"`` keeps the stored pixels
(masks made from the stored arrays). A mask that fits the stored image but not the
turned one is refused with that hint. Before, the tag was ignored: a non-square image's
mask was refused as of another size, a square one's was silently misaligned.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medseg.data.dataset import write_dataset_json
from medseg.data.io import ImageGeometry, png_sixteen_bit_colour, write_image
from medseg.data.prepare.output import check_dataset_output
from medseg.data.prepare.verify import publish_dataset, temporary_dataset
from medseg.errors import ArgumentError, DataError

__all__ = ["INPUT_ENDINGS", "Pairing", "pair_files", "convert_2d_folders"]

INPUT_ENDINGS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".gif", ".bmp", ".ppm", ".pgm")
_MAX_DISTINCT_LABELS = 32  # more distinct grey values than this is an image, not a label map


@dataclass
class Pairing:
    """Result of matching image and mask files by key."""

    pairs: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    images_without_mask: list[Path] = field(default_factory=list)
    masks_without_image: list[Path] = field(default_factory=list)


def _ending(path: Path) -> str:
    name = path.name.lower()
    for ending in INPUT_ENDINGS:
        if name.endswith(ending):
            return ending
    return ""


def _key(path: Path, suffix: str) -> str | None:
    stem = path.name[: len(path.name) - len(_ending(path))]
    if suffix:
        if not stem.endswith(suffix):
            return None
        stem = stem[: len(stem) - len(suffix)]
    return stem or None


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _ending(p))


def pair_files(images_dir: Path, masks_dir: Path, image_suffix: str = "", mask_suffix: str = "") -> Pairing:
    """Match images to masks by key (name minus ending minus suffix).

    When both folders are the same, files ending in ``mask_suffix`` are the masks and
    the rest the images.

    Raises
    ------
    DataError
        A folder is missing or has no image files; two files give the same key (e.g.
        ``a.png`` and ``a.tif``); the same folder for both without a ``mask_suffix``.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    same = images_dir.resolve() == masks_dir.resolve()
    if same and not mask_suffix:
        raise DataError(f"{masks_dir}: images and masks in one folder need --mask-suffix to tell them apart")
    mask_files = _files(masks_dir)
    image_files = _files(images_dir)
    if same:
        mask_files = [p for p in mask_files if _key(p, mask_suffix) is not None]
        image_files = [p for p in image_files if p not in set(mask_files)]
    if not image_files:
        raise DataError(f"{images_dir}: no image files ({', '.join(INPUT_ENDINGS)})")
    if not mask_files:
        raise DataError(f"{masks_dir}: no mask files ({', '.join(INPUT_ENDINGS)})")

    def index(files: list[Path], suffix: str, kind: str) -> tuple[dict[str, Path], list[Path]]:
        by_key: dict[str, Path] = {}
        unkeyed = []
        for p in files:
            key = _key(p, suffix)
            if key is None:
                unkeyed.append(p)
                continue
            if key in by_key:
                raise DataError(f"{p}: same {kind} key '{key}' as {by_key[key].name}")
            by_key[key] = p
        return by_key, unkeyed

    images, bad_images = index(image_files, image_suffix, "image")
    masks, bad_masks = index(mask_files, mask_suffix, "mask")
    result = Pairing()
    for key in sorted(images):
        if key in masks:
            result.pairs[key] = (images[key], masks[key])
        else:
            result.images_without_mask.append(images[key])
    result.images_without_mask = sorted(result.images_without_mask + bad_images)
    result.masks_without_image = sorted([masks[k] for k in masks if k not in images] + bad_masks)
    return result


EXIF_MODES = ("apply", "ignore")
_EXIF_ORIENTATION = 0x0112
# what turning by each Orientation value does (EXIF 2.3, tag 274; 1 is upright)
_TURNS = {2: "mirrored", 3: "turned 180°", 4: "flipped", 5: "transposed", 6: "turned 90° clockwise",
          7: "transversed", 8: "turned 90° anticlockwise"}


def _read(path: Path, kind: str, exif: str = "apply") -> tuple[np.ndarray, int]:
    """``(rows, cols)`` or ``(rows, cols, channels)`` array of ``path`` and the EXIF
    Orientation it was turned by (1: upright, or ``exif="ignore"``, or a TIFF, which
    tifffile reads as stored, as medseg predict does); module docstring."""
    orientation = 1
    try:
        if _ending(path) in (".tif", ".tiff"):
            import tifffile

            data = np.asarray(tifffile.imread(path))
            if data.ndim == 3 and data.shape[0] in (3, 4) and data.shape[-1] not in (3, 4):
                data = np.moveaxis(data, 0, -1)  # planar RGB
        elif _ending(path) == ".png" and png_sixteen_bit_colour(path) is not None:
            # PIL opens 16-bit RGB(A) PNGs as 8-bit "RGB": every value lost its low byte, silently
            import SimpleITK as sitk

            data = np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
        else:
            from PIL import Image, ImageOps

            with Image.open(path) as img:
                img.load()
                if exif == "apply":
                    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                    orientation = orientation if orientation in _TURNS else 1
                    img = ImageOps.exif_transpose(img)
                if img.mode == "P":
                    img = _resolve_palette(img, kind)
                if img.mode == "1":
                    data = np.asarray(img, dtype=np.uint8)
                elif img.mode == "PA":
                    data = np.asarray(img.convert("RGBA"))
                elif img.mode == "CMYK":
                    data = np.asarray(img.convert("RGB"))
                else:
                    data = np.asarray(img)
    except DataError:
        raise
    except Exception as err:  # PIL and tifffile raise many types for bad files
        raise DataError(f"{path}: unreadable {kind} ({type(err).__name__}: {err})") from None
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim == 3 and data.shape[-1] in (2, 4):  # grey + alpha, RGB + alpha
        alpha = data[..., -1]
        opaque = np.iinfo(alpha.dtype).max if alpha.dtype.kind in "iu" else 1.0
        if np.any(alpha != opaque):
            raise DataError(f"{path}: {kind} has a transparent alpha channel; flatten it first")
        data = data[..., :-1]
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] != 3):
        raise DataError(f"{path}: expected a 2D grey or RGB {kind}, got array shape {data.shape}")
    return data, orientation


def _resolve_palette(img, kind: str):
    """Palette images: colours for images; for masks the grey values when the palette is
    grey (GIF masks such as DRIVE's), else the palette indices (indexed label maps)."""
    if kind == "image":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    indices = np.unique(np.asarray(img))
    palette = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    used = palette[indices[indices < len(palette)]]
    if len(used) == len(indices) and np.all(used[:, 0] == used[:, 1]) and np.all(used[:, 1] == used[:, 2]):
        return img.convert("L")
    return img


def _mask_values(path: Path, data: np.ndarray, threshold: float | None) -> np.ndarray:
    if data.ndim == 3:
        if not (np.array_equal(data[..., 0], data[..., 1]) and np.array_equal(data[..., 0], data[..., 2])):
            raise DataError(f"{path}: colour-coded RGB mask; convert it to grey/indexed label values first")
        data = data[..., 0]
    if threshold is not None:
        return (data > threshold).astype(np.uint8)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise DataError(f"{path}: mask has non-integer values; pass --foreground-threshold to binarise it")
        data = data.astype(np.int64)
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    values = np.unique(data)
    if values.min() < 0:
        raise DataError(f"{path}: mask has negative values ({int(values.min())})")
    top = np.iinfo(data.dtype).max if data.dtype.kind in "iu" else None
    for full in {top, 255, 65535} - {None}:
        if full > 1 and set(values.tolist()) <= {0, full} and full in values:
            return (data == full).astype(np.uint8)  # binary mask saved at full range (8 or 16 bits)
    if len(values) > _MAX_DISTINCT_LABELS:
        raise DataError(
            f"{path}: mask has {len(values)} distinct values (e.g. JPEG noise or anti-aliasing); "
            f"pass --foreground-threshold T to binarise it"
        )
    return data.astype(np.uint8 if values.max() <= 255 else np.uint16)


def convert_2d_folders(
    images_dir: str | Path,
    masks_dir: str | Path,
    out_dir: str | Path,
    *,
    image_suffix: str = "",
    mask_suffix: str = "",
    foreground_threshold: float | None = None,
    label_names: list[str] | None = None,
    grayscale: bool = False,
    channel_names: list[str] | None = None,
    name: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    exif: str = "apply",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert paired image/mask folders into an nnU-Net v2 dataset of 2D images.

    Parameters
    ----------
    images_dir, masks_dir : path
        Folders of images and masks (may be the same folder, with ``mask_suffix``).
    out_dir : path
        Dataset folder to create.
    image_suffix, mask_suffix : str
        Removed from the file stems before matching (see module docstring).
    foreground_threshold : float or None
        Binarise masks at ``value > T``; ``None`` keeps integer label values.
    label_names : list of str or None
        Names of labels 1, 2, ... (default ``foreground`` for binary masks, else
        ``label_1``, ``label_2``, ...).
    grayscale : bool
        Convert RGB images to one luminance channel (ITU-R 601, as PIL's ``"L"``).
    channel_names : list of str or None
        ``channel_names`` of ``dataset.json`` (default ``R, G, B`` or ``gray``).
    strict : bool
        Unmatched files are an error instead of being reported and skipped.
    overwrite : bool
        Replace an existing ``out_dir``.
    exif : str
        ``"apply"``: turn images and masks upright as their EXIF Orientation says (as
        viewers and annotation tools show them); ``"ignore"``: keep the stored pixels.

    Returns
    -------
    dict
        ``root``, ``cases``, ``num_channels``, ``labels``, ``file_ending``,
        ``images_without_mask``, ``masks_without_image``.

    Raises
    ------
    DataError
        Missing folders, no pairs, unmatched files with ``strict``, an unreadable file,
        image and mask sizes that differ, images with different channel counts, or an
        existing ``out_dir`` (each one line naming the file).
    """
    from tqdm import tqdm

    say = log or (lambda msg: print(msg, file=sys.stderr))
    if exif not in EXIF_MODES:
        raise ArgumentError("exif", f"expected one of {', '.join(EXIF_MODES)}", exif)
    out_dir = Path(out_dir)
    check_dataset_output(out_dir, overwrite, {"--images": Path(images_dir), "--masks": Path(masks_dir)})
    pairing = pair_files(Path(images_dir), Path(masks_dir), image_suffix, mask_suffix)
    for kind, files in (("image(s) without a mask", pairing.images_without_mask),
                        ("mask(s) without an image", pairing.masks_without_image)):
        if files:
            shown = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "")
            if strict:
                raise DataError(f"{files[0].parent}: {len(files)} {kind}: {shown}")
            say(f"skipping {len(files)} {kind}: {shown}")
    if not pairing.pairs:
        raise DataError(
            f"{images_dir}: no image matches a mask in {masks_dir} "
            f"(check --image-suffix {image_suffix!r} / --mask-suffix {mask_suffix!r})"
        )

    # First pass: read everything, so that the file ending and channel count are known
    # (and every bad file reported) before anything is written.
    items, mask_paths = [], []
    num_channels = None
    needs_tiff = False
    first_name = ""
    turned: list[str] = []
    for key, (image_path, mask_path) in tqdm(pairing.pairs.items(), desc="reading", disable=not progress or not sys.stderr.isatty(), file=sys.stderr, leave=False):
        image, orientation = _read(image_path, "image", exif)
        if grayscale and image.ndim == 3:
            image = _luminance(image)
        mask = _mask_values(mask_path, _read(mask_path, "mask", exif)[0], foreground_threshold)
        if orientation != 1:
            turned.append(image_path.name)
        if mask.shape != image.shape[:2]:
            hint = ""
            if orientation in (5, 6, 7, 8) and mask.shape == image.shape[1::-1]:
                hint = (f"; the image is {_TURNS[orientation]} by its EXIF orientation ({orientation}), as viewers "
                        "show it, and the mask fits the stored pixels: pass --exif ignore")
            raise DataError(
                f"{mask_path}: mask size {mask.shape} differs from image {image_path.name} {image.shape[:2]}{hint}"
            )
        channels = 1 if image.ndim == 2 else image.shape[-1]
        if num_channels is None:
            num_channels, first_name = channels, image_path.name
        elif channels != num_channels:
            raise DataError(
                f"{image_path}: {channels} channel(s) but {first_name} has {num_channels} "
                f"(pass --grayscale to convert colour images to grey)"
            )
        if image.dtype.kind == "f" or (image.size and (image.min() < 0 or image.max() > 65535)):
            needs_tiff = True  # PNG holds unsigned integers up to 16 bits only
        items.append((_case_name(key), image, mask))
        mask_paths.append(mask_path)
    names = [n for n, _, _ in items]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise DataError(f"{images_dir}: keys {clash[:3]} give the same case name after replacing unsafe characters")
    assert num_channels is not None
    ending = ".tif" if needs_tiff else ".png"

    max_label = max(int(m.max()) for _, _, m in items)
    if max_label == 0:
        raise DataError(f"{masks_dir}: every mask is empty (all background); check --foreground-threshold")
    # labels must be 0, 1, 2, ... over the whole dataset: 0/128/255 anti-aliased masks
    # declared 255 labels and trained a 256-class network
    used = sorted(set().union(*(np.unique(m).tolist() for _, _, m in items)))
    if used != list(range(len(used))):
        gap = next(v for i, v in enumerate(used) if v != i)
        where = next(path for path, (_, _, m) in zip(mask_paths, items) if np.any(m == gap))
        raise DataError(
            f"{where}: mask value {gap}, but the masks' values {used[:6]}{'...' if len(used) > 6 else ''} "
            "are not 0, 1, 2, ... (anti-aliased edges, or masks saved at other ranges); "
            "pass --foreground-threshold T to binarise them"
        )
    binary = foreground_threshold is not None or max_label == 1
    labels = {"background": 0}
    for value in range(1, max_label + 1):
        if label_names and value <= len(label_names):
            labels[label_names[value - 1]] = value
        else:
            labels["foreground" if binary and value == 1 else f"label_{value}"] = value
    if label_names and len(label_names) > max_label:
        raise ArgumentError("label_names", f"{len(label_names)} name(s) given but the masks use labels 1..{max_label}")
    if channel_names:
        if len(channel_names) != num_channels:
            raise ArgumentError(
                "channel_names", f"{len(channel_names)} name(s) given but the images have {num_channels} channel(s)"
            )
        channels_json = dict(enumerate(channel_names))
    else:
        channels_json = dict(enumerate(["R", "G", "B"] if num_channels == 3 else ["gray"]))

    tmp = temporary_dataset(out_dir)
    try:
        for case, image, mask in tqdm(items, desc="writing", disable=not progress or not sys.stderr.isatty(), file=sys.stderr, leave=False):
            planes = [image] if image.ndim == 2 else [image[..., c] for c in range(num_channels)]
            for c, plane in enumerate(planes):
                # medseg reads 2D natural images as (rows, cols) with the identity affine.
                write_image(tmp / "imagesTr" / f"{case}_{c:04d}{ending}", plane, ImageGeometry.identity(plane.shape))
            write_image(tmp / "labelsTr" / f"{case}{ending}", mask, ImageGeometry.identity(mask.shape))
        write_dataset_json(
            tmp,
            channel_names=channels_json,
            labels=labels,
            num_training=len(items),
            file_ending=ending,
            name=name or out_dir.name,
            converted_from=f"{Path(images_dir).name} + {Path(masks_dir).name} (medseg data_scripts/convert_2d.py)",
        )
        publish_dataset(tmp, out_dir, say)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if turned:
        shown = ", ".join(turned[:5]) + (", ..." if len(turned) > 5 else "")
        say(f"turned {len(turned)} image(s) upright by their EXIF orientation, as viewers show them: {shown} "
            "(--exif ignore keeps the stored pixels)")
    say(f"{out_dir}: {len(items)} case(s), {num_channels} channel(s), labels {labels}, {ending} files")
    return {
        "root": out_dir,
        "cases": names,
        "num_channels": num_channels,
        "labels": labels,
        "file_ending": ending,
        "images_without_mask": pairing.images_without_mask,
        "masks_without_image": pairing.masks_without_image,
    }


def _luminance(rgb: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114])
    grey = rgb.astype(np.float64) @ weights
    if rgb.dtype.kind in "iu":
        return np.clip(np.round(grey), 0, np.iinfo(rgb.dtype).max).astype(rgb.dtype)
    return grey.astype(rgb.dtype)


def _case_name(key: str) -> str:
    """A file-system and nnU-Net friendly case name (spaces and odd characters -> ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "case"
