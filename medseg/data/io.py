"""Reading and writing images with their geometry, for every format medseg accepts.

One convention for all formats, the one nibabel uses: an image is an array indexed in
voxel order ``(i, j[, k])`` and a 4x4 ``affine`` that maps voxel indices to world
coordinates in millimetres, RAS+ (world x grows towards the patient's Right, y towards
Anterior, z towards Superior). NIfTI (``.nii``, ``.nii.gz``) is read with
nibabel, whose affine is already RAS+. NRRD and MetaImage (``.nrrd``, ``.mha``) are read
with SimpleITK, whose origin/direction live in ITK's LPS+ world; they are converted with
``affine_ras = diag(-1, -1, 1, 1) @ affine_lps`` on the way in and back on the way out,
and SimpleITK's ``[k, j, i]`` array is transposed to ``[i, j, k]``. So the same scan
saved as ``.nii.gz`` and ``.nrrd`` reads back as the same array and the same affine.

2D natural images (``.png``, ``.tif``/``.tiff``) carry no geometry: they read as a
``(rows, cols)`` array with the identity affine (spacing 1), as nnU-Net's
``NaturalImage2DIO`` treats them. A 2D NIfTI, stored as ``(X, Y)`` or ``(X, Y, 1)``,
reads as a 2D array too, keeping its affine.

Multi-channel files (an RGB PNG, an MSD-style 4D NIfTI with channels last, a vector
MetaImage) are read with :func:`read_image_channels`; :func:`read_image` is for
single-channel files and says so when given a multi-channel one.

Writes are atomic: a hidden temporary file in the destination folder is written and
then moved over the destination with :func:`os.replace`, so an interrupted write never
leaves a half-written image under the final name.
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.atomic import storage_error
from medseg.errors import DataError

try:  # ISA-L's gzip: NIfTI .gz files decompress 2-2.5x faster (see _load_nifti)
    from isal import igzip as _igzip
except ImportError:  # pragma: no cover - a dependency, but reading works without it
    _igzip = None

__all__ = [
    "SUPPORTED_ENDINGS",
    "NATURAL_IMAGE_ENDINGS",
    "ImageGeometry",
    "read_image",
    "read_image_channels",
    "read_geometry",
    "png_sixteen_bit_colour",
    "write_image",
    "ending_of",
    "strip_ending",
]

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff")
NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".nrrd", ".mha")
NATURAL_IMAGE_ENDINGS = (".png", ".tif", ".tiff")

# ITK's world is LPS+, nibabel's (and medseg's) is RAS+: flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- geometry

def planar_affine(affine: Any) -> np.ndarray:
    """The 4x4 affine of a 2D image expressed in its own plane, for 2D transforms.

    MONAI (``to_affine_nd(2, A)``) and the resampling here read a 2D image's geometry from
    the world x/y rows of its first two columns. That block is singular for a coronal or
    sagittal slice and shortens the spacing of a tilted one. This returns an affine whose
    first two columns lie in world x/y and describe the same grid isometrically: the
    columns ``c0, c1`` and origin ``o`` written in an orthonormal basis ``(u, v)`` of the
    slice plane, ``u`` the plane's projection of the first world axis not along the
    plane's normal ``n``, ``v = ±(n x u)`` towards the second. An axial slice (``n`` along z)
    gets ``u = x, v = y``: its affine comes back unchanged, and the function is idempotent.
    Rows 3-4 hold the slice axis (along z) and the homogeneous row.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):  # already a 2D (3x3) affine
        return affine.copy()
    c0, c1, origin = affine[:3, 0], affine[:3, 1], affine[:3, 3]
    normal = np.cross(c0, c1)
    length = float(np.linalg.norm(normal))
    if length == 0.0:  # degenerate columns: nothing better to say
        return affine.copy()
    normal = normal / length
    k = int(np.argmax(np.abs(normal)))
    i, j = [a for a in range(3) if a != k]
    u = np.eye(3)[i] - normal[i] * normal
    u = u / np.linalg.norm(u)
    v = np.cross(normal, u)
    if v[j] < 0:
        v = -v
    out = np.eye(4)
    out[:2, :2] = [[u @ c0, u @ c1], [v @ c0, v @ c1]]
    out[:2, 3] = [u @ origin, v @ origin]
    out[2, 2] = float(np.linalg.norm(affine[:3, 2])) or 1.0
    out[2, 3] = normal @ origin
    return out


@dataclass(frozen=True, eq=False)
class ImageGeometry:
    """Where the voxels of an image are in the world.

    Attributes
    ----------
    affine : np.ndarray
        4x4 float64 matrix mapping voxel indices ``(i, j, k, 1)`` to world millimetres,
        RAS+ (nibabel's convention), for every file format. For 2D images the third
        column describes the (unused) slice axis.
    shape : tuple of int
        Spatial shape in voxel order (2 or 3 entries).

    The affine is stored read-only. Compare geometries with :meth:`allclose` (``==``
    is identity: float affines from different writers differ in the last bits).
    """

    affine: np.ndarray
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
        affine.setflags(write=False)
        shape = tuple(int(s) for s in self.shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"spatial shape must have 2 or 3 entries, got {shape}")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> "ImageGeometry":
        """Spacing 1, origin 0, axes aligned with RAS (what a PNG has)."""
        return cls(np.eye(4), tuple(shape))

    @classmethod
    def from_spacing(
        cls,
        shape: tuple[int, ...],
        spacing: tuple[float, ...],
        origin: tuple[float, ...] | None = None,
        direction: np.ndarray | None = None,
    ) -> "ImageGeometry":
        """Build the affine ``[direction @ diag(spacing) | origin]`` (RAS+).

        ``direction`` is a 3x3 matrix whose columns are the unit world directions of the
        voxel axes (identity when omitted); for 2D the slice axis gets spacing 1.
        """
        ndim = len(shape)
        if len(spacing) != ndim:
            raise ValueError(f"spacing {spacing} does not match shape {shape}")
        zooms = list(spacing) + [1.0] * (3 - ndim)
        direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        affine = np.eye(4)
        affine[:3, :3] = direction @ np.diag(zooms)
        if origin is not None:
            affine[: len(origin), 3] = origin
        return cls(affine, tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each voxel axis (column norms of the affine)."""
        norms = np.linalg.norm(self.affine[:3, : self.ndim], axis=0)
        return tuple(float(v) for v in norms)

    @property
    def voxel_size(self) -> float:
        """Volume (mm³; a 2D image's area, mm²) of one voxel: sqrt(det(MᵀM)) of the
        affine's voxel columns M. The product of :attr:`spacing` unless the axes are
        sheared (a CT's gantry tilt kept in the affine), where that product is too large
        by 1/cos of the tilt (+10 % at 25°)."""
        columns = self.affine[:3, : self.ndim]
        return float(np.sqrt(abs(np.linalg.det(columns.T @ columns))))

    @property
    def origin(self) -> tuple[float, ...]:
        """World position (RAS+, mm) of the centre of voxel 0."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def axcodes(self) -> tuple[str, ...]:
        """Closest anatomical axis codes, e.g. ``('L', 'P', 'S')`` (nibabel.aff2axcodes); of a
        2D image, those of its :func:`planar_affine` (the frame its 2D transforms use)."""
        import nibabel as nib

        affine = planar_affine(self.affine) if self.ndim == 2 else self.affine
        return tuple(nib.aff2axcodes(affine))[: self.ndim]

    def _compared_columns(self) -> list[int]:
        # a 2D image's slice axis (column 2) places no voxel: a slice thickness or a
        # slice direction written differently by two tools is no difference
        return [0, 1, 3] if self.ndim == 2 else [0, 1, 2, 3]

    def allclose(self, other: "ImageGeometry", atol: float = 1e-4) -> bool:
        """Same shape and affine entries equal within ``atol`` (mm, absolute); for 2D images
        the slice axis's column is not compared."""
        columns = self._compared_columns()
        return self.shape == tuple(other.shape) and bool(
            np.allclose(self.affine[:, columns], other.affine[:, columns], rtol=0.0, atol=atol)
        )

    def max_affine_difference(self, other: "ImageGeometry") -> float:
        columns = self._compared_columns()
        return float(np.max(np.abs(self.affine[:, columns] - other.affine[:, columns])))

    def to_dict(self) -> dict[str, Any]:
        """JSON/checkpoint friendly form (lists of floats and ints)."""
        return {"affine": self.affine.tolist(), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageGeometry":
        return cls(np.asarray(data["affine"], dtype=np.float64), tuple(data["shape"]))

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.4g}" for s in self.spacing)
        return f"ImageGeometry(shape={self.shape}, spacing=({spacing}), axcodes={''.join(self.axcodes)})"


# --------------------------------------------------------------------------- endings

def ending_of(path: str | Path) -> str:
    """The file ending medseg dispatches on: ``'.nii.gz'``, ``'.nrrd'``, ... (lower case).

    Unknown endings come back as the last suffix (``'.jpg'``) or ``''``.
    """
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def strip_ending(path: str | Path, ending: str | None = None) -> str:
    """The file name without its ending: ``case_001_0000.nii.gz`` -> ``case_001_0000``."""
    name = Path(path).name
    ending = ending or ending_of(path)
    if ending and name.lower().endswith(ending.lower()):
        return name[: len(name) - len(ending)]
    return name


def _check_supported(path: Path) -> str:
    ending = ending_of(path)
    if ending not in SUPPORTED_ENDINGS:
        raise DataError(
            f"{path}: unsupported file ending '{ending or path.name}' "
            f"(supported: {', '.join(SUPPORTED_ENDINGS)})"
        )
    return ending


def _reason(err: BaseException, path: Path | None = None) -> str:
    """One line from an exception message (SimpleITK's span several lines)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    # ITK: "...\nITK ERROR: MetaImageIO(0x5565...): File cannot be read: X for reading.\nReason: ..."
    itk = [ln for ln in lines if "ERROR:" in ln]
    text = itk[-1] if itk else (lines[0] if lines else "")
    text = re.sub(r"^.*?ERROR:\s*", "", text)
    text = re.sub(r"^(\w+)\(0x[0-9a-fA-F]+\):\s*", r"\1: ", text)
    if path is not None:
        text = text.replace(f'"{path}"', "file").replace(str(path), "file")
    text = text.strip(" -:")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --------------------------------------------------------------------------- reading

def read_image_channels(path: str | Path) -> tuple[np.ndarray, ImageGeometry]:
    """Read any supported file as ``(C, *spatial)`` plus its geometry.

    ``C`` is 1 for ordinary single-channel files; it is the colour channels of an
    RGB(A) PNG/TIF (as nnU-Net's natural-image reader), the 4th axis of an MSD-style
    4D NIfTI, or the components of a vector NRRD/MetaImage.

    Raises
    ------
    DataError
        The file is missing, has an unsupported ending, is unreadable or truncated, or
        is not 2D/3D (after dropping singleton channel axes).
    """
    array, geometry = _read(Path(path), header_only=False)
    return _c_order(array), geometry


def read_geometry(path: str | Path) -> tuple[int, ImageGeometry]:
    """The number of channels and the geometry of a file, from its header alone.

    The same ``C`` and :class:`ImageGeometry` as :func:`read_image_channels` (the same
    code lays out the axes), without decoding the voxels: for checks of whole folders
    before any work starts (a label of another shape than its scan). Problems that only
    the voxels show (a truncated file, an unsupported voxel type) are found by the full
    read.

    Raises
    ------
    DataError
        As :func:`read_image_channels` for everything the header says.
    """
    array, geometry = _read(Path(path), header_only=True)
    return int(array.shape[0]), geometry


def _placeholder(shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """An array of ``shape`` that holds no memory (stride 0): what a header-only read
    lays out in place of the voxels."""
    return np.broadcast_to(np.zeros((), dtype=dtype), tuple(int(s) for s in shape))


def _read(path: Path, header_only: bool, palette: str = "colours") -> tuple[np.ndarray, ImageGeometry]:
    """``palette``: what a palette PNG's pixels are, ``"colours"`` (a scan: its RGB) or
    ``"indices"`` (a label map: indexed classes, as VOC stores them)."""
    ending = _check_supported(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if ending in NIFTI_ENDINGS:
            array, geometry = _read_nifti(path, header_only)
        elif ending in ITK_ENDINGS:
            array, geometry = _read_itk(path, header_only)
        elif ending == ".png":
            array, geometry = _read_png(path, header_only, palette)
        else:
            array, geometry = _read_tiff(path, header_only)
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as err:  # every reader has its own exception zoo
        raise DataError(f"{path}: unreadable or truncated image ({_reason(err, path)})") from None
    if not header_only:
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if array.dtype.kind not in "biuf":
            raise DataError(f"{path}: unsupported voxel type {array.dtype}")
    if 0 in array.shape:
        raise DataError(f"{path}: empty image (shape {array.shape[1:]})")
    _check_geometry(path, geometry)
    return array, geometry


def _check_geometry(path: Path, geometry: ImageGeometry) -> None:
    """Refuse a header whose voxel-to-world affine cannot place the voxels: NaN/Inf
    entries, a zero spacing or voxel axes that are not independent (resampling,
    reorienting and every distance in mm would be undefined)."""
    affine = geometry.affine
    if not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: the header's voxel-to-world affine has NaN or infinite entries")
    axes = affine[:3, : geometry.ndim]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0) or np.linalg.matrix_rank(axes / np.where(spacing > 0, spacing, 1), tol=1e-6) < geometry.ndim:
        shown = ", ".join(f"{s:.4g}" for s in spacing)
        raise DataError(f"{path}: degenerate voxel axes in the header (spacing {shown} mm, or axes not independent)")


def read_image(path: str | Path) -> tuple[np.ndarray, ImageGeometry]:
    """Read a single-channel image: array in voxel order and its :class:`ImageGeometry`.

    The dtype is the file's (``uint8`` labels stay ``uint8``; NIfTI scaling
    ``scl_slope``/``scl_inter`` is applied, giving floats).

    Raises
    ------
    DataError
        As :func:`read_image_channels`, and when the file holds several channels.
    """
    array, geometry = _read(Path(path), header_only=False, palette="indices")  # a palette PNG: label indices
    if array.shape[0] != 1:
        raise DataError(
            f"{path}: holds {array.shape[0]} channels in one file; expected a single-channel image"
        )
    return _c_order(array)[0], geometry


def _squeeze_spatial(path: Path, array: np.ndarray, what: str) -> np.ndarray:
    """Channels-first array with trailing singleton spatial axes dropped to 2D/3D."""
    # array: (C, *spatial)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim - 1 not in (2, 3):
        raise DataError(f"{path}: expected a 2D or 3D {what}, got spatial shape {array.shape[1:]}")
    return array


def _load_nifti(path: Path, header_only: bool = False) -> tuple[Any, np.ndarray]:
    """The NIfTI image and its voxels (scaling applied), read in one pass; with
    ``header_only`` a :func:`_placeholder` of the voxels' shape (nothing decoded).

    A ``.nii.gz`` is decompressed with ISA-L (``isal.igzip``, a drop-in gzip reader) when
    it is installed: 2-2.5x faster than Python's gzip module on a 512x512x100 int16 CT,
    and streamed into the array as nibabel does (no second copy). Anything the fast path
    does not take (NIfTI-2, a damaged file) goes through ``nibabel.load``, whose errors
    name the problem.
    """
    import nibabel as nib

    with _nibabel_notes() as notes:
        img = data = None
        if _igzip is not None and not header_only and path.name.lower().endswith(".gz"):
            try:
                with _igzip.open(path, "rb") as handle:
                    img = nib.Nifti1Image.from_stream(handle)
                    data = np.asarray(np.asanyarray(img.dataobj))
            except Exception:  # noqa: BLE001 - the standard reader below reports it
                img = None
        if img is None:
            img = nib.load(str(path), mmap=False)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise DataError(f"{path}: not a NIfTI image ({type(img).__name__})")
            if header_only:
                data = _placeholder(img.shape, img.get_data_dtype())
            else:
                data = np.asarray(np.asanyarray(img.dataobj))
    # nibabel sets a zero pixdim to 1; where pixdim places the voxels (no sform), that
    # spacing is a guess
    if any("pixdim" in n and "non-zero" in n for n in notes) and int(img.header["sform_code"]) == 0:
        from nibabel.openers import Opener

        with Opener(str(path)) as handle:
            raw = type(img.header).from_fileobj(handle, check=False)["pixdim"][1:4]
        spatial = 2 if len(img.shape) == 2 or (len(img.shape) == 3 and img.shape[2] == 1) else 3
        if np.any(raw[:spatial] == 0):
            shown = ", ".join(f"{v:g}" for v in raw[:spatial])
            raise DataError(f"{path}: zero voxel spacing in the header (pixdim {shown})")
    return img, data


@contextmanager
def _nibabel_notes() -> Iterator[list[str]]:
    """The header problems nibabel logs while reading (and fixes where it can), collected
    instead of printed to stderr: medseg reports what matters in one line."""
    import logging

    import nibabel as nib

    logger = nib.imageglobals.logger
    notes: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [_Collect()], False
    try:
        yield notes
    finally:
        logger.handlers, logger.propagate = saved


def _c_order(array: np.ndarray, block: int = 8) -> np.ndarray:
    """``np.ascontiguousarray(array)``, copied in blocks of the first two spatial axes.

    NIfTI voxels come in Fortran order; numpy's plain copy of a transposed 3D volume walks
    memory with large strides and took 0.19 s for 512x512x100 int16, blocks of 8x8 columns
    take 0.10 s (the same values).
    """
    if array.flags.c_contiguous or array.ndim < 4 or array.size < (1 << 20):
        return np.ascontiguousarray(array)
    out = np.empty(array.shape, array.dtype)
    for c in range(array.shape[0]):
        for x in range(0, array.shape[1], block):
            for y in range(0, array.shape[2], block):
                out[c, x : x + block, y : y + block] = array[c, x : x + block, y : y + block]
    return out


#: Millimetres per NIfTI spatial unit (``xyzt_units``). ITK, and so ITK-SNAP, Slicer and
#: nnU-Net's SimpleITK reader, converts a file in metres or microns to mm, spacing and
#: origin alike; nibabel's affine is in the file's units. Read as nibabel's, a scan in
#: metres was 0.0008 mm a voxel and predicted as an empty mask, and evaluate's "mm" were
#: microns. An unknown unit is read as mm, as ITK reads it.
_MM_PER_NIFTI_UNIT = {"meter": 1000.0, "micron": 0.001}


def _mm_per_unit(header: Any) -> float:
    return _MM_PER_NIFTI_UNIT.get(header.get_xyzt_units()[0], 1.0)


def _in_mm(affine: Any, header: Any) -> np.ndarray:
    """A NIfTI affine in the file's spatial units, in mm."""
    affine = np.array(affine, dtype=np.float64)
    affine[:3] *= _mm_per_unit(header)
    return affine


#: The fields of a NIfTI header that place its voxels (with pixdim's qfac and spacings).
_GEOMETRY_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                    "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")


def stored_nifti_geometry(reference: str | Path, affine: Any) -> dict[str, Any] | None:
    """The fields of ``reference``'s NIfTI header that place its voxels, as stored in the
    file, when they place them at ``affine`` (mm); else None (another geometry, or not a
    readable NIfTI).

    nibabel changes some of them on load (a negative pixdim becomes positive, an
    unknown sform code 0): copied from a loaded header, a mask of a scan stored with
    pixdim -0.8 had +0.8, and ITK-based viewers showed it mirrored against its scan.
    The caller writes them into its output's header (:func:`set_geometry_fields`).
    """
    import nibabel as nib

    try:
        with _nibabel_notes():
            checked = nib.load(str(reference)).header
            if not isinstance(checked, nib.Nifti1Header):  # Nifti2Header is one too
                return None
            if not np.allclose(_in_mm(checked.get_best_affine(), checked), np.asarray(affine), rtol=0, atol=1e-6):
                return None
            return _stored_geometry_fields(reference, type(checked))
    except Exception:  # noqa: BLE001 - no stored geometry to keep: the caller writes its own
        return None


def _stored_geometry_fields(reference: str | Path, header_class: type) -> dict[str, Any]:
    """:data:`_GEOMETRY_FIELDS` and pixdim's first four of ``reference``'s header as stored
    (read unchecked: nibabel's checks are what changed them)."""
    from nibabel.openers import Opener

    with Opener(str(reference)) as handle:
        raw = header_class.from_fileobj(handle, check=False)
    fields = {name: raw[name].copy() for name in _GEOMETRY_FIELDS}
    fields["pixdim"] = raw["pixdim"][:4].copy()  # qfac and the spatial spacings
    return fields


def set_geometry_fields(header: Any, fields: dict[str, Any]) -> None:
    """Write :func:`stored_nifti_geometry`'s fields into a NIfTI header."""
    for name, value in fields.items():
        if name == "pixdim":
            pixdim = header["pixdim"].copy()
            pixdim[:4] = value
            header["pixdim"] = pixdim
        else:
            header[name] = value


def _read_nifti(path: Path, header_only: bool) -> tuple[np.ndarray, ImageGeometry]:
    img, data = _load_nifti(path, header_only)
    affine = _in_mm(img.affine, img.header)
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector intent: (X, Y, Z, 1, C)
        data = data[:, :, :, 0, :]
    if data.ndim == 4:  # MSD-style: channels last
        array = np.moveaxis(data, -1, 0)
    elif data.ndim in (2, 3):
        array = data[None]
    else:
        raise DataError(f"{path}: expected a 2D, 3D or 4D (channels last) NIfTI, got shape {data.shape}")
    array = _squeeze_spatial(path, array, "image")
    return array, ImageGeometry(affine, array.shape[1:])


def _itk_affine(image: Any) -> np.ndarray:
    """RAS+ 4x4 affine of a SimpleITK image or of an image file reader that read the
    file's information (2D images embedded in 3D)."""
    ndim = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:ndim, :ndim] = direction @ np.diag(spacing)
    lps[:ndim, 3] = origin
    return _LPS_TO_RAS @ lps


@contextmanager
def _stderr_held() -> Iterator[None]:
    """What C++ code prints to stderr (file descriptor 2) while the block runs, held back.

    ITK's MetaImage and NRRD readers print their diagnostics there besides raising; the
    exception already says what is wrong. The held text is printed after all when the
    block succeeds (it may hold another thread's output too), and dropped when it raises.
    """
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)  # reached only when the block succeeded
        text = sink.read()
        if text:
            os.write(2, text)


def _check_voxels_inside(path: Path) -> None:
    """Refuse a MetaImage or NRRD header whose voxels are in another file
    (``ElementDataFile = /elsewhere/x.raw``, NRRD's ``data file:``): SimpleITK reads that
    file wherever it is, so a scan of a downloaded dataset could bring any file of the
    machine into training, a prediction or a report's pictures (or hang on /dev/zero or
    a FIFO), around the check that keeps dataset.json's paths inside the dataset.
    medseg's endings (.mha, .nrrd) hold their voxels themselves."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return  # SimpleITK's read reports it
    if path.name.lower().endswith(".mha"):
        for line in head.split(b"\n"):
            key, equals, value = line.partition(b"=")
            if equals and key.strip().lower() == b"elementdatafile":
                if value.strip().upper() != b"LOCAL":
                    shown = value.strip().decode("utf-8", "replace")[:200]
                    raise DataError(f"{path}: its voxels are in another file (ElementDataFile = {shown}); "
                                    "medseg reads .mha files that hold their own (ElementDataFile = LOCAL)")
                return
    else:  # NRRD: the header ends at the first empty line
        for line in head.split(b"\n\n", 1)[0].split(b"\n"):
            key, colon, value = line.partition(b":")
            if colon and key.strip().lower() in (b"data file", b"datafile"):
                shown = value.strip().decode("utf-8", "replace")[:200]
                raise DataError(f"{path}: a detached NRRD header, its voxels are in another file ({shown}); "
                                "medseg reads .nrrd files that hold their own")


def _read_itk(path: Path, header_only: bool) -> tuple[np.ndarray, ImageGeometry]:
    import SimpleITK as sitk

    _check_voxels_inside(path)
    if header_only:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        with _stderr_held():
            reader.ReadImageInformation()
        if reader.GetDimension() != 4:
            size, ncomp = reader.GetSize(), reader.GetNumberOfComponents()
            return _itk_layout(path, _placeholder((*size[::-1], ncomp)), ncomp, reader)
        # a 4D file: its 3D geometry is what slicing the image gives (read below)
    with _stderr_held():
        image = sitk.ReadImage(str(path))
    ndim = image.GetDimension()
    if ndim == 4:  # a trailing singleton 4th axis, e.g. from a time series of one
        size = image.GetSize()
        if size[3] != 1:
            raise DataError(f"{path}: 4D image of size {size}; store channels as separate files")
        image = image[:, :, :, 0]
        ndim = 3
    ncomp = image.GetNumberOfComponentsPerPixel()
    if header_only:
        return _itk_layout(path, _placeholder((*image.GetSize()[::-1], ncomp)), ncomp, image)
    return _itk_layout(path, sitk.GetArrayFromImage(image), ncomp, image)


def _itk_layout(path: Path, data: np.ndarray, ncomp: int, image: Any) -> tuple[np.ndarray, ImageGeometry]:
    """``(C, i, j[, k])`` from SimpleITK's ``[k, j, i]`` or ``[k, j, i, components]``
    array (``data`` may have a trailing axis of one component), and its geometry."""
    ndim = image.GetDimension()
    if ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D or 3D image, got {ndim}D")
    if ncomp > 1 or data.ndim == ndim + 1:
        data = np.moveaxis(data, -1, 0)  # (C, k, j, i)
    else:
        data = data[None]
    array = data.transpose(0, *range(data.ndim - 1, 0, -1))  # (C, i, j, k)
    affine = _itk_affine(image)
    # a single slice stored 3D (X, Y, 1) is a 2D image, as the same slice in a NIfTI file
    array = _squeeze_spatial(path, array, "image")
    return array, ImageGeometry(affine, array.shape[1:])


def png_sixteen_bit_colour(path: str | Path) -> tuple[int, int, int] | None:
    """``(rows, cols, channels)`` of a PNG that holds 16 bits per sample of colour (IHDR
    bit depth 16, colour type 2 or 6), else None. PIL opens such a file as 8-bit "RGB":
    every value loses its low byte, silently."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    if len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 6):
        return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big"), 3 if head[25] == 2 else 4
    return None


def _read_png(path: Path, header_only: bool, palette: str = "colours") -> tuple[np.ndarray, ImageGeometry]:
    from PIL import Image

    sixteen = png_sixteen_bit_colour(path)
    if sixteen is not None:  # SimpleITK reads all 16 bits (PIL the high byte only)
        if header_only:
            data = _placeholder(sixteen)
        else:
            import SimpleITK as sitk

            with _stderr_held():
                data = np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    else:
        with Image.open(path) as img:
            # a palette scan's pixels are its colours (its indices were segmented before,
            # as convert_2d.py reads them); a palette label map's are its classes
            colours = img.mode == "P" and palette == "colours"
            if header_only:  # numpy's array of the image: (rows, cols) or (rows, cols, bands)
                bands = (4 if "transparency" in img.info else 3) if colours else len(img.getbands())
                data = _placeholder((img.height, img.width) + ((bands,) if bands > 1 else ()))
            else:
                img.load()  # decode now: a truncated file fails here, not later
                if colours:
                    data = np.asarray(img.convert("RGBA" if "transparency" in img.info else "RGB"))
                elif img.mode == "1":
                    data = np.asarray(img, dtype=np.uint8)
                else:
                    data = np.asarray(img)
    if data.ndim == 2:
        array = data[None]
    elif data.ndim == 3:
        array = np.moveaxis(data, -1, 0)
    else:
        raise DataError(f"{path}: unexpected PNG array shape {data.shape}")
    return array, ImageGeometry.identity(array.shape[1:])


def _read_tiff(path: Path, header_only: bool) -> tuple[np.ndarray, ImageGeometry]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        data = _placeholder(series.shape) if header_only else series.asarray()
    # 'S' (samples: RGB) is a channel axis; every other axis is spatial in file order.
    if "S" in axes:
        array = np.moveaxis(data, axes.index("S"), 0)
    else:
        array = data[None]
    while array.ndim > 3 and 1 in array.shape[1:]:  # e.g. a single page stored as 'QYX'
        array = np.squeeze(array, axis=1 + array.shape[1:].index(1))
    if array.ndim - 1 not in (2, 3):
        raise DataError(f"{path}: expected a 2D or 3D TIFF, got axes {axes} shape {data.shape}")
    sidecar = _tiff_spacing_sidecar(path) if array.ndim == 4 else None  # 2D TIFFs read no files beside them
    if sidecar is not None:
        # nnU-Net's Tiff3DIO keeps the spacing of CASE_0000.tif in CASE.json; medseg reads
        # TIFFs without geometry (a voxel is 1), so such a dataset was planned, trained and
        # evaluated as isotropic without a word
        raise DataError(
            f"{path}: a 3D TIFF with a spacing file ({sidecar.name}, nnU-Net's Tiff3DIO layout); medseg reads TIFFs "
            "without geometry, so its spacing would be lost: convert the dataset to .nii.gz (e.g. with SimpleITK, "
            "setting the spacing) and set file_ending to .nii.gz"
        )
    return array, ImageGeometry.identity(array.shape[1:])


def _tiff_spacing_sidecar(path: Path) -> Path | None:
    """nnU-Net's Tiff3DIO spacing file of a TIFF: ``CASE.json`` for ``CASE_0000.tif`` (an
    image channel) or ``CASE.tif`` (a segmentation), when it exists."""
    stem = strip_ending(path)
    match = re.fullmatch(r"(.+)_\d{4}", stem)
    for name in ([match.group(1)] if match else []) + [stem]:
        candidate = path.with_name(f"{name}.json")
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- writing

def write_image(
    path: str | Path,
    array: np.ndarray,
    geometry: ImageGeometry,
    reference_path: str | Path | None = None,
) -> None:
    """Write a single-channel 2D/3D ``array`` with ``geometry``, atomically.

    The format follows the ending of ``path``. Re-reading gives the same values and
    geometry (affines through NIfTI's float32 sform agree to ~1e-5 mm). ``bool`` is
    stored as ``uint8`` and ``int64`` as ``int32`` when the values fit (NIfTI readers
    commonly reject 64-bit integers). PNG/TIF store no geometry: a non-identity
    geometry is dropped with a warning; PNG takes only integers in ``[0, 65535]``.

    ``reference_path`` (typically the input scan of a prediction): when it has the same
    format family, its header is reused so that the output's header matches the
    input's (NIfTI: sform/qform codes and matrices, units, description, pixdim, and a
    2D scan's on-disk ``(X, Y, 1)`` shape; NRRD/MHA: extra metadata keys). The data
    type and scaling are the array's own; intent and ``cal_min/cal_max`` are reset.

    Raises
    ------
    DataError
        Unsupported ending, array/geometry shape mismatch, or a value range the format
        cannot store.
    """
    path = Path(path)
    ending = _check_supported(path)
    array = np.asarray(array)
    if tuple(array.shape) != tuple(geometry.shape):
        raise DataError(f"{path}: array shape {array.shape} does not match geometry shape {geometry.shape}")
    array = _storable(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{strip_ending(path, ending)}.tmp-{uuid.uuid4().hex[:8]}{ending}")
    reference = Path(reference_path) if reference_path is not None else None
    try:
        if ending in NIFTI_ENDINGS:
            ref = reference if reference is not None and ending_of(reference) in NIFTI_ENDINGS else None
            _write_nifti(tmp, array, geometry, ref)
        elif ending in ITK_ENDINGS:
            ref = reference if reference is not None and ending_of(reference) in ITK_ENDINGS else None
            _write_itk(tmp, array, geometry, ref)
        else:
            if not np.allclose(geometry.affine, np.eye(4), atol=1e-6):
                warnings.warn(
                    f"{path}: {ending} files store no geometry; spacing/orientation {geometry!r} is not saved",
                    stacklevel=2,
                )
            if ending == ".png":
                _write_png(path, tmp, array)
            else:
                _write_tiff(tmp, array)
        os.replace(tmp, path)
    except OSError as err:
        cause = storage_error(err, path)
        if cause is None:
            raise
        raise cause from err
    finally:
        if tmp.exists():
            tmp.unlink()


def _storable(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        if array.size == 0 or (array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max):
            return array.astype(np.int32)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def _write_nifti(tmp: Path, array: np.ndarray, geometry: ImageGeometry, reference: Path | None) -> None:
    import nibabel as nib

    affine = np.asarray(geometry.affine, dtype=np.float64)
    if reference is not None:
        try:
            ref_img = nib.load(str(reference))
        except Exception as err:
            raise DataError(f"{reference}: unreadable reference header ({_reason(err)})") from None
        header = ref_img.header.copy()
        affine = affine.copy()
        affine[:3] /= _mm_per_unit(header)  # stored in the reference's units, as its header says
        sform_code = int(header["sform_code"])
        qform_code = int(header["qform_code"])
        ref_shape = tuple(ref_img.shape)
        if len(ref_shape) <= 3 and ref_shape[: array.ndim] == array.shape and all(n == 1 for n in ref_shape[array.ndim :]):
            array = array.reshape(ref_shape)  # keep a 2D scan's on-disk (X, Y, 1)
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(np.nan, np.nan)
        header.set_data_shape(array.shape)
        # what describes the reference's *values* does not carry over
        header.set_intent("none")
        header["cal_min"], header["cal_max"] = 0.0, 0.0
        cls = type(ref_img) if isinstance(ref_img, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
        if np.allclose(header.get_best_affine(), affine, rtol=0, atol=1e-6):
            # the reference's geometry (a prediction of that scan): its header as it is,
            # codes and both matrices. Setting them turned codes 0/0 into an 'aligned'
            # sform, which ITK reads where it reads no sform at all (the mask moved off
            # the scan there), and copied the sform over a qform that differed from it.
            img = cls(array, None, header=header)
            if isinstance(ref_img.header, nib.Nifti1Header):  # Nifti2Header is one too
                # the fields as stored, after the image's own copy of the header, which nibabel fixed again
                set_geometry_fields(img.header, _stored_geometry_fields(reference, type(ref_img.header)))
        else:
            # another geometry: store it, keeping the reference's codes
            header.set_sform(affine, code=sform_code or "aligned")
            header.set_qform(affine, code=qform_code)
            img = cls(array, affine, header=header)
            # nibabel rewrites sform/qform when the affine differs from the header's best
            # affine; make sure the codes are the reference's whatever it decided.
            img.header.set_sform(affine, code=sform_code or "aligned")
            img.header.set_qform(affine, code=qform_code)
    else:
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm")
        img.header.set_sform(affine, code="aligned")
        img.header.set_qform(affine, code="scanner")
    nib.save(img, str(tmp))


def _write_itk(tmp: Path, array: np.ndarray, geometry: ImageGeometry, reference: Path | None) -> None:
    import SimpleITK as sitk

    reader = None
    if reference is not None:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(reference))
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            raise DataError(f"{reference}: unreadable reference header ({_reason(err)})") from None
        if array.ndim == 2 and tuple(reader.GetSize()) == (*array.shape, 1):
            array = array[..., None]  # keep a 2D scan's on-disk (X, Y, 1)
    ndim = array.ndim
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))  # sitk wants [k, j, i]
    lps = np.linalg.inv(_LPS_TO_RAS) @ geometry.affine
    matrix = lps[:ndim, :ndim]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 0):
        raise DataError(f"{tmp.name}: degenerate affine (zero spacing)")
    direction = matrix / spacing
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:ndim, 3]])
    image.SetDirection([float(d) for d in direction.ravel()])
    if reader is not None:
        try:
            for key in reader.GetMetaDataKeys():
                if not key.startswith(("ITK_", "NRRD_")):
                    try:
                        image.SetMetaData(key, reader.GetMetaData(key))
                    except (TypeError, UnicodeError):  # a damaged key (not text) is not carried over
                        continue
        except RuntimeError as err:
            raise DataError(f"{reference}: unreadable reference header ({_reason(err)})") from None
    sitk.WriteImage(image, str(tmp), useCompression=True)


def _write_png(path: Path, tmp: Path, array: np.ndarray) -> None:
    from PIL import Image

    if array.ndim != 2:
        raise DataError(f"{path}: PNG holds 2D images only, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            pass  # integer-valued floats (e.g. a label read as float) are fine
        else:
            raise DataError(f"{path}: PNG stores integers only, got {array.dtype}; use .tif or .nii.gz")
    lo, hi = (array.min(), array.max()) if array.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise DataError(f"{path}: PNG stores values in [0, 65535], got [{lo}, {hi}]")
    data = array.astype(np.uint8 if hi <= 255 else np.uint16)
    Image.fromarray(data).save(tmp, format="PNG")


def _write_tiff(tmp: Path, array: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(tmp, array, photometric="minisblack")
