"""Fixtures for the dataset preparation scripts: a local HTTP server and a tiny MSD task.

The server listens on 127.0.0.1 only (an ephemeral port) and serves bytes registered by
the test. Per path it can honour ``Range`` requests (default), ignore them (always
``200`` with the whole body), or drop the connection after N bytes of the body on the
first request. Every request's path and ``Range`` header are recorded, so tests can
assert that a resume really asked for the rest instead of starting over.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import re
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Served:
    body: bytes
    honour_range: bool = True
    drop_after: int | None = None  # first request only: close after this many body bytes
    requests: int = 0


@dataclass
class LocalServer:
    base_url: str
    files: dict[str, Served] = field(default_factory=dict)
    log: list[tuple[str, str | None]] = field(default_factory=list)

    def serve(self, name: str, body: bytes, **behaviour) -> str:
        self.files[f"/{name}"] = Served(body, **behaviour)
        return f"{self.base_url}/{name}"

    def ranges(self, name: str) -> list[str | None]:
        return [r for p, r in self.log if p == f"/{name}"]


def _handler(server_state: LocalServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):  # noqa: N802 - http.server API
            rng = self.headers.get("Range")
            server_state.log.append((self.path, rng))
            served = server_state.files.get(self.path)
            if served is None:
                self.send_error(404, "Not Found")
                return
            served.requests += 1
            body, start, status = served.body, 0, 200
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and served.honour_range:
                start = int(m.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            payload = body[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Accept-Ranges", "bytes" if served.honour_range else "none")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            if served.drop_after is not None and served.requests == 1:
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload[: served.drop_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def http_server():
    """A :class:`LocalServer` on 127.0.0.1, shut down after the test."""
    state = LocalServer(base_url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    httpd.timeout = 5
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- tiny MSD task

# A flipped, anisotropic, translated affine: a conversion that drops geometry fails.
MSD_AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 12.5], [0.0, -0.7, 0.0, -30.0], [0.0, 0.0, 1.5, 7.25], [0.0, 0.0, 0.0, 1.0]]
)
MSD_SHAPE = (8, 7, 6)
MSD_CHANNELS = ("T2", "ADC")


@dataclass
class MsdTask:
    tar_bytes: bytes
    md5: str
    images: dict[str, np.ndarray]  # case -> (x, y, z, c) image
    labels: dict[str, np.ndarray]
    label_bytes: dict[str, bytes]
    test_cases: list[str]
    affine: np.ndarray = field(default_factory=lambda: MSD_AFFINE.copy())
    channels: tuple[str, ...] = MSD_CHANNELS
    image_bytes: dict[str, bytes] = field(default_factory=dict)


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return gzip.compress(img.to_bytes(), mtime=0)  # a .nii.gz file


def make_msd_tar(task: str = "Task05_Prostate", seed: int = 0, channels: tuple[str, ...] = MSD_CHANNELS) -> MsdTask:
    """An MSD-style ``.tar``: 2 training cases (4D ``(x, y, z, c)`` images, or 3D for one
    channel), 1 test case, MSD ``dataset.json`` and the macOS ``._`` companions the real
    archives carry."""
    rng = np.random.default_rng(seed)
    images, labels, label_bytes, image_bytes = {}, {}, {}, {}
    extra = (len(channels),) if len(channels) > 1 else ()
    members: dict[str, bytes] = {}
    training = []
    for case in ("prostate_00", "prostate_02"):
        image = rng.normal(100, 20, MSD_SHAPE + extra).astype(np.float32)
        label = (rng.random(MSD_SHAPE) > 0.7).astype(np.uint8)
        label[0, 0, 0] = 2
        images[case], labels[case] = image, label
        image_bytes[case] = members[f"{task}/imagesTr/{case}.nii.gz"] = _nifti_bytes(image, MSD_AFFINE)
        members[f"{task}/imagesTr/._{case}.nii.gz"] = b"\x00\x05\x16\x07 AppleDouble junk"
        label_bytes[case] = _nifti_bytes(label, MSD_AFFINE)
        members[f"{task}/labelsTr/{case}.nii.gz"] = label_bytes[case]
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    test_image = rng.normal(0, 1, MSD_SHAPE + extra).astype(np.float32)
    members[f"{task}/imagesTs/prostate_01.nii.gz"] = _nifti_bytes(test_image, MSD_AFFINE)
    dataset_json = {
        "name": "PROSTATE",
        "description": "tiny test copy",
        "licence": "CC-BY-SA 4.0",
        "tensorImageSize": "4D",
        "modality": {str(i): n for i, n in enumerate(channels)},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": 2,
        "numTest": 1,
        "training": training,
        "test": ["./imagesTs/prostate_01.nii.gz"],
    }
    members[f"{task}/dataset.json"] = json.dumps(dataset_json, indent=4).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(members):
            data = members[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = buf.getvalue()
    return MsdTask(tar_bytes, hashlib.md5(tar_bytes).hexdigest(), images, labels, label_bytes, ["prostate_01"],
                   channels=tuple(channels), image_bytes=image_bytes)


@pytest.fixture(scope="session")
def msd_task() -> MsdTask:
    return make_msd_tar()


@pytest.fixture(scope="session")
def msd_task_3d() -> MsdTask:
    """Single-channel task (3D images, as the CT tasks Task03, Task08, Task09)."""
    return make_msd_tar("Task09_Spleen", seed=1, channels=("CT",))


@pytest.fixture(scope="session")
def load_script():
    """``load_script("download")`` imports ``data_scripts/download.py`` by path."""
    return _load_script


def _load_script(name: str):
    path = REPO / "data_scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_medseg_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
