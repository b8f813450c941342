"""Build the custom-op library (custom_ops/ -> build/custom_ops/libonnxfgq_ops.so).

Two steps, both idempotent:
1. ``fetch_ort_headers``: the ONNX Runtime C/C++ API headers come from Debian's
   ``libonnxruntime-dev`` package. Debian 12 does not ship it, so the .deb is downloaded from a
   newer suite of the same archive (``http://deb.debian.org/debian``), checked against the
   SHA256 in the suite's Packages index and unpacked into ``build/ort-headers/``. Headers are
   never committed; a second call finds them there and does nothing.
2. ``build``: cmake configure + build. CUDA kernels are compiled when cmake finds nvcc.

Standard library only, so it also runs from ``tools/build_custom_ops.py`` before the package
is installed.
"""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIR = REPO_ROOT / "custom_ops"
BUILD_ROOT = REPO_ROOT / "build"
HEADERS_DIR = BUILD_ROOT / "ort-headers"
CMAKE_BUILD_DIR = BUILD_ROOT / "custom_ops"
LIBRARY_NAME = "libonnxfgq_ops.so"

DEBIAN_MIRROR = os.environ.get("ONNXFGQ_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SUITE = os.environ.get("ONNXFGQ_DEBIAN_SUITE", "trixie")
PACKAGE = "libonnxruntime-dev"
_DEB_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class BuildError(RuntimeError):
    """The custom-op library could not be built (missing tool, download or compile failure)."""


def _include_dir(root: Path) -> Path:
    return root / "usr" / "include" / "onnxruntime"


def _download(url: str, timeout: float = 120.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError as exc:  # URLError, HTTPError, timeouts
        raise BuildError(f"could not download {url}: {exc}. The ONNX Runtime headers come from Debian's "
                         f"{PACKAGE}; set ONNXFGQ_ORT_INCLUDE_DIR to a directory holding "
                         f"onnxruntime_c_api.h to skip the download.") from exc


def _find_package(index: str, name: str) -> dict[str, str]:
    for stanza in index.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package") == name:
            return fields
    raise BuildError(f"package {name} not found in the {DEBIAN_SUITE} index of {DEBIAN_MIRROR}")


def _extract_deb(deb: Path, dest: Path) -> None:
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        return
    # Without dpkg: a .deb is an ar archive holding data.tar.*.
    blob = deb.read_bytes()
    pos = 8  # "!<arch>\n"
    while pos + 60 <= len(blob):
        name = blob[pos:pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48:pos + 58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tempfile.NamedTemporaryFile(suffix=name) as tmp:
                tmp.write(body)
                tmp.flush()
                with tarfile.open(tmp.name) as tar:
                    tar.extractall(dest, filter="data")
            return
        pos += 60 + size + (size & 1)
    raise BuildError(f"{deb} holds no data.tar member")


def fetch_ort_headers(dest: Path = HEADERS_DIR) -> Path:
    """Return a directory holding the ONNX Runtime API headers, downloading them on first use."""
    override = os.environ.get("ONNXFGQ_ORT_INCLUDE_DIR")
    if override:
        path = Path(override)
        if not (path / "onnxruntime_c_api.h").is_file():
            raise BuildError(f"ONNXFGQ_ORT_INCLUDE_DIR={override} has no onnxruntime_c_api.h")
        return path
    include = _include_dir(dest)
    if (include / "onnxruntime_cxx_api.h").is_file():
        return include
    arch = _DEB_ARCH.get(platform.machine().lower())
    if arch is None:
        raise BuildError(f"no Debian architecture known for machine type {platform.machine()!r}")
    index_url = f"{DEBIAN_MIRROR}/dists/{DEBIAN_SUITE}/main/binary-{arch}/Packages.xz"
    index = lzma.decompress(_download(index_url)).decode("utf-8", "replace")
    fields = _find_package(index, PACKAGE)
    deb_bytes = _download(f"{DEBIAN_MIRROR}/{fields['Filename']}")
    digest = hashlib.sha256(deb_bytes).hexdigest()
    if fields.get("SHA256") and digest != fields["SHA256"]:
        raise BuildError(f"SHA256 mismatch for {fields['Filename']}: got {digest}, index says {fields['SHA256']}")
    dest.mkdir(parents=True, exist_ok=True)
    deb = dest / Path(fields["Filename"]).name
    deb.write_bytes(deb_bytes)
    staging = Path(tempfile.mkdtemp(prefix="ort-headers-", dir=dest))
    try:
        _extract_deb(deb, staging)
        if not (_include_dir(staging) / "onnxruntime_cxx_api.h").is_file():
            raise BuildError(f"{deb.name} has no usr/include/onnxruntime/onnxruntime_cxx_api.h")
        shutil.rmtree(dest / "usr", ignore_errors=True)
        (staging / "usr").rename(dest / "usr")
        (dest / "VERSION").write_text(f"{PACKAGE} {fields.get('Version', '?')} from {DEBIAN_SUITE}\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return include


def library_in_build_dir() -> Path:
    return CMAKE_BUILD_DIR / LIBRARY_NAME


def build(force: bool = False, cuda: str | None = "AUTO", jobs: int | None = None, verbose: bool = False) -> Path:
    """Configure and build the library; returns its path.

    cuda: AUTO (CUDA kernels when nvcc is found), ON, OFF, or None to keep what an existing
    build folder was configured with (AUTO for a new one).
    """
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"'{tool}' is not on PATH: install cmake and a C++17 compiler (e.g. apt-get install "
                             f"cmake g++) to build the custom-op library")
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    # Several test sessions (or CI jobs) may share one checkout: one build at a time.
    with open(BUILD_ROOT / ".custom_ops.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _build_locked(force, cuda, jobs, verbose)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_locked(force: bool, cuda: str | None, jobs: int | None, verbose: bool) -> Path:
    include = fetch_ort_headers()
    if force:
        shutil.rmtree(CMAKE_BUILD_DIR, ignore_errors=True)
    quiet = not verbose
    configure = ["cmake", "-S", str(SOURCE_DIR), "-B", str(CMAKE_BUILD_DIR), f"-DORT_INCLUDE_DIR={include}",
                 "-DCMAKE_BUILD_TYPE=Release"]
    if cuda is None and not (CMAKE_BUILD_DIR / "CMakeCache.txt").is_file():
        cuda = "AUTO"
    if cuda is not None:
        configure.append(f"-DONNXFGQ_CUDA={cuda.upper()}")
    compile_ = ["cmake", "--build", str(CMAKE_BUILD_DIR), "-j", str(jobs or os.cpu_count() or 2)]
    for cmd in (configure, compile_):
        try:
            subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=quiet, text=True)
        except subprocess.CalledProcessError as exc:
            output = ((exc.stdout or "") + (exc.stderr or ""))[-6000:]
            raise BuildError(f"command failed ({exc.returncode}): {' '.join(cmd)}\n{output}") from exc
    library = library_in_build_dir()
    if not library.is_file():
        raise BuildError(f"build finished but {library} is missing")
    return library
