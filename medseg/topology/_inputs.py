"""Validation and conversion of the arrays handed to the engine.

The engine takes C-contiguous float32 or float64 arrays; float32 stays float32 (no
float64 copy). Everything a user can get wrong is reported here as a
:class:`TopologyInputError` (a ``ValueError``) naming the argument.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from medseg.errors import MedsegError

FILTRATIONS = ("superlevel", "sublevel")
CONSTRUCTIONS = ("V", "T")
COMPARISONS = ("union", "intersection")
#: Engine backends. "cpu-parallel" runs the CUDA backend's algorithm on CPU threads
#: (for testing it where there is no GPU); "auto" is "cpu" (and "cuda" for CUDA tensors
#: once _backends.CUDA_FOR_AUTO is on, after the device code has run on a GPU). The
#: environment variable MEDSEG_TOPOLOGY_BACKEND replaces "auto" (e.g. to run a test
#: suite on "cuda").
#: :func:`medseg.topology._backends.resolve_backend` turns a name into a backend object.
BACKENDS = ("auto", "cpu", "cuda", "cpu-parallel")
#: Largest image (voxels) the engine handles: 3 x voxels must fit in 32 bits (cells.hpp).
MAX_VOXELS = 1431655765


class TopologyInputError(MedsegError, ValueError):
    """An image, mask or option given to :mod:`medseg.topology` is invalid."""


class TopologyBackendError(MedsegError, RuntimeError):
    """The requested engine backend is not available here (e.g. "cuda" without a GPU)."""


def to_numpy(x: Any, name: str = "image") -> np.ndarray:
    """``x`` (a numpy array, a torch tensor on any device, nested lists) as a numpy array;
    a tensor without values (on the meta device), a sparse one and ragged lists are one
    TopologyInputError naming ``name`` (torch's and numpy's own errors named neither)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        if getattr(x, "is_meta", False):
            raise TopologyInputError(f"{name}: a tensor on the meta device holds no values")
        if getattr(x, "layout", None) is not None and str(x.layout) != "torch.strided":
            raise TopologyInputError(f"{name}: a {x.layout} tensor; give a dense one (.to_dense())")
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except ValueError as err:  # ragged nested lists
        raise TopologyInputError(f"{name}: not a rectangular array ({err})") from None


_EXACT_IN_FLOAT64 = 2**53
"""Integers up to this magnitude convert to float64 exactly (distinct values stay distinct)."""


def as_image(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite, non-empty, C-contiguous 2D/3D float32 or float64 array."""
    arr = to_numpy(x, name)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.bool_ or (np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize <= 2):
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.itemsize == 8 and arr.size and max(abs(int(arr.min())), abs(int(arr.max()))) > _EXACT_IN_FLOAT64:
            raise TopologyInputError(
                f"{name}: {arr.dtype} values beyond ±2**53 cannot be ranked exactly (they are compared as float64); "
                "rescale the image"
            )
        arr = arr.astype(np.float64)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating) and arr.dtype not in (np.float32, np.float64):
        raise TopologyInputError(f"{name}: dtype {arr.dtype} is not supported (float16, float32 and float64 are); "
                                 "convert it with .astype(np.float64)")
    elif arr.dtype not in (np.float32, np.float64):
        raise TopologyInputError(f"{name}: expected a real-valued array, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise TopologyInputError(
            f"{name}: expected a 2D or 3D array, got {arr.ndim}D with shape {arr.shape}"
        )
    if arr.size == 0:
        raise TopologyInputError(f"{name}: the array is empty (shape {arr.shape})")
    if arr.size > MAX_VOXELS:
        raise TopologyInputError(
            f"{name}: {arr.size} voxels is more than the engine supports ({MAX_VOXELS}, about 1100^3)"
        )
    refuse_non_finite(arr, name)
    return np.ascontiguousarray(arr)


def refuse_non_finite(arr: np.ndarray, name: str) -> None:
    """A TopologyInputError counting the NaN and infinite values of ``arr``, if it holds any."""
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(arr.size - finite.sum() - n_nan)
        raise TopologyInputError(f"{name}: contains {n_nan} NaN and {n_inf} infinite values")


def as_pair(prediction: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p = as_image(prediction, "prediction")
    t = as_image(target, "target")
    if p.shape != t.shape:
        raise TopologyInputError(f"prediction has shape {p.shape} but target has shape {t.shape}")
    if p.dtype != t.dtype:  # rank both in the wider type
        p, t = p.astype(np.float64), t.astype(np.float64)
    return p, t


def check_filtration(filtration: str) -> bool:
    """True for a superlevel filtration."""
    if filtration not in FILTRATIONS:
        raise TopologyInputError(f"filtration must be one of {FILTRATIONS}, got {filtration!r}")
    return filtration == "superlevel"


def check_construction(construction: str) -> str:
    if construction not in CONSTRUCTIONS:
        raise TopologyInputError(f"construction must be 'V' or 'T', got {construction!r}")
    return construction


def check_comparison(comparison: str) -> bool:
    """True for the intersection comparison image."""
    if comparison not in COMPARISONS:
        raise TopologyInputError(f"comparison must be 'union' or 'intersection', got {comparison!r}")
    return comparison == "intersection"


def check_flag(name: str, value: object) -> bool:
    """A true/false option; a string such as ``'no'`` would otherwise count as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise TopologyInputError(f"{name} must be True or False, got {value!r}")
    return bool(value)


MAX_THREADS = 4096
"""More engine threads than any machine medseg runs on has cores: a typo."""


def default_threads(threads: int | None) -> int:
    if threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_THREADS:
        raise TopologyInputError(f"threads must be a whole number from 1 to {MAX_THREADS} (or None: all cores), got {threads!r}")
    return int(threads)


def relative_padding_value(images: list, superlevel: bool) -> float:
    """The value of the padding of a relative matching: one that enters the filtration
    first in both images (the largest of their values for superlevel, the smallest for
    sublevel). ``images``: arrays or tensors."""
    return max(float(im.max()) for im in images) if superlevel else min(float(im.min()) for im in images)


def pad_relative(images: list[np.ndarray], superlevel: bool) -> list[np.ndarray]:
    """Pad by one voxel whose value enters the filtration first (relative to the border)."""
    value = relative_padding_value(images, superlevel)
    return [np.pad(im, 1, mode="constant", constant_values=im.dtype.type(value)) for im in images]


def unpad(coords: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if coords.size == 0:
        return coords
    out = coords - 1
    np.clip(out, 0, np.asarray(shape) - 1, out=out)
    return out


# The engine modules told whether they may run their threads on the process's OpenMP
# team (see _checked_team); forgotten in a forked child.
_team_checked: set[str] = set()
_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True
    _team_checked.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _checked_team(module) -> None:
    """Keep the engine off the parent's OpenMP team in a forked or multiprocessing child.

    The engine runs its threads as a parallel region of PyTorch's OpenMP runtime, whose
    workers would otherwise spin on the cores it needs (``run_team`` in
    csrc/host_passes.hpp). libgomp hangs when a child forked after the parent used a team
    starts one, so in such a child the engine keeps threads of its own: after an
    ``os.fork`` seen here, and in every child of ``multiprocessing`` (DataLoader and
    process-pool workers; spawned ones only lose the gain). The engine itself also
    notices forks once it is loaded. The CUDA backend's host passes follow the same rule.
    """
    if module.__name__ in _team_checked:
        return
    import multiprocessing

    if _forked or multiprocessing.parent_process() is not None:
        module.use_openmp_team(False)
    _team_checked.add(module.__name__)


def engine_missing() -> str:
    """Why ``medseg.topology._engine`` cannot be imported, in one sentence, with the way out.

    After ``pip install .`` (not editable) the built modules are in site-packages only; run
    from the source folder, ``python -m medseg`` (and ``python -m pytest``) import that
    folder's ``medseg/`` first, which holds none: said so, rather than "reinstall"."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent.parent
    if (root / "pyproject.toml").is_file() and _installed_elsewhere() and not any(here.glob("_engine*.so")):
        return (f"medseg is imported from its source folder {root}, which holds no built topology engine: after "
                "`pip install .` run from another folder (`python -m` puts the current folder first on the path), "
                "or install with `pip install -e .`")
    return ("medseg's topology engine (medseg.topology._engine) is not built; reinstall medseg with "
            "`pip install -e .` (needs a C++17 compiler and CMake)")


def _installed_elsewhere() -> bool:
    """Whether a non-editable medseg is installed (an editable one's modules are found
    from its source folder by design)."""
    import json
    from importlib import metadata

    try:
        record = metadata.distribution("medseg").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return False
    try:
        return not json.loads(record or "{}").get("dir_info", {}).get("editable", False)
    except ValueError:
        return True


def engine():
    try:
        from medseg.topology import _engine
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise ImportError(engine_missing()) from exc
    _checked_team(_engine)
    _check_cache_setting()
    return _engine


_checked_cache_setting: str | None = None


def _check_cache_setting() -> None:
    """Refuse a ``MEDSEG_TOPOLOGY_CACHE_MB`` the engine would not read: it takes a whole
    number of megabytes up to 2**40 (csrc/big_vector.hpp) and ignores anything else."""
    global _checked_cache_setting
    value = os.environ.get("MEDSEG_TOPOLOGY_CACHE_MB")
    if value is None or value == _checked_cache_setting:
        return
    if not (value.isdigit() and value.isascii() and int(value) <= 2**40):
        raise TopologyInputError(
            f"MEDSEG_TOPOLOGY_CACHE_MB={value!r}: expected a whole number of megabytes (0 turns the cache off)"
        )
    _checked_cache_setting = value


def cuda_engine():
    """The CUDA backend module, or None when it was not built."""
    try:
        from medseg.topology import _engine_cuda
    except ImportError:
        return None
    _checked_team(_engine_cuda)
    return _engine_cuda


def cuda_available() -> bool:
    """True when the CUDA backend is built and at least one CUDA device is usable."""
    mod = cuda_engine()
    return mod is not None and mod.device_count() > 0


def is_cuda_array(x: Any) -> bool:
    """A CUDA torch tensor or any object exposing ``__cuda_array_interface__`` (CuPy)."""
    device = getattr(x, "device", None)
    if getattr(device, "type", None) == "cuda":
        return True
    return hasattr(x, "__cuda_array_interface__")


def as_device_image(x: Any, name: str):
    """A CUDA tensor (torch) as a finite, C-contiguous 2D/3D float32/float64 tensor on its device."""
    import torch  # only reached with a torch tensor in hand

    if not isinstance(x, torch.Tensor):  # CuPy and others: through DLPack
        x = torch.from_dlpack(x)
    x = x.detach()
    if x.dtype == torch.bool or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    elif not x.is_floating_point() and not x.is_complex():
        if x.element_size() == 8 and x.numel() and max(abs(int(x.min())), abs(int(x.max()))) > _EXACT_IN_FLOAT64:
            raise TopologyInputError(
                f"{name}: {x.dtype} values beyond ±2**53 cannot be ranked exactly (they are compared as float64); "
                "rescale the image"
            )
        x = x.to(torch.float64)
    elif x.dtype not in (torch.float32, torch.float64):
        raise TopologyInputError(f"{name}: expected a real-valued tensor, got dtype {x.dtype}")
    if x.dim() not in (2, 3):
        raise TopologyInputError(f"{name}: expected a 2D or 3D array, got {x.dim()}D with shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise TopologyInputError(f"{name}: the array is empty (shape {tuple(x.shape)})")
    if x.numel() > MAX_VOXELS:
        raise TopologyInputError(f"{name}: {x.numel()} voxels is more than the engine supports ({MAX_VOXELS})")
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~torch.isfinite(x)).sum()) - n_nan
        raise TopologyInputError(f"{name}: contains {n_nan} NaN and {n_inf} infinite values")
    return x.contiguous()


def as_device_pair(prediction: Any, target: Any):
    """A validated (prediction, target) pair of tensors on the CUDA device of the CUDA one(s)."""
    import torch

    named = (("prediction", prediction), ("target", target))
    out = {name: as_device_image(x, name) for name, x in named if is_cuda_array(x)}
    device = next(iter(out.values())).device
    for name, x in named:  # a host array next to a CUDA tensor: validated here, then moved
        if name not in out:
            out[name] = torch.from_numpy(as_image(x, name)).to(device)
    p, t = out["prediction"], out["target"]
    if p.device != t.device:
        raise TopologyInputError(f"prediction is on {p.device} but target is on {t.device}")
    if tuple(p.shape) != tuple(t.shape):
        raise TopologyInputError(f"prediction has shape {tuple(p.shape)} but target has shape {tuple(t.shape)}")
    if p.dtype != t.dtype:  # rank both in the wider type
        p, t = p.to(torch.float64), t.to(torch.float64)
    return p.contiguous(), t.contiguous()


def pad_relative_device(images: list, superlevel: bool) -> list:
    """:func:`pad_relative` for tensors, on their device."""
    import torch

    value = relative_padding_value(images, superlevel)
    return [torch.nn.functional.pad(im, (1, 1) * im.dim(), mode="constant", value=value).contiguous() for im in images]
