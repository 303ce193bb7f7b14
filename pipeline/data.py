"""prepare stage: put verified MNIST under <data_dir>/MNIST/raw and load it onto a device.

Two ways in, one layout out (torchvision's, so torchvision itself finds the files later):
- download through `torchvision.datasets.MNIST` (machines with internet);
- `source`: a folder or URL holding the four IDX files, gzipped or not (air-gapped clusters, CI).
Each file's *decompressed* content is checked against the known MD5 before it is renamed into
place, so an interrupted or corrupt prepare leaves nothing half-written behind.

    gradbench prepare --data-dir data --source /mnt/mirror/mnist
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .runtime import host_lock

if TYPE_CHECKING:  # torch is imported lazily: `gradbench prepare` and `--help` do not need it
    import torch

DATA_DIR_ENV = "GRADBENCH_DATA_DIR"
SOURCE_ENV = "GRADBENCH_MNIST_SOURCE"

# MD5 of each file's decompressed content (the .gz of a mirror may be re-compressed).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Standard normalization constants of the MNIST training set.
MEAN, STD = 0.1307, 0.3081


class DataError(Exception):
    """The source or the prepared data is missing, unreadable or corrupt (a usage problem)."""


class DownloadError(Exception):
    """A download failed (network or server trouble, not the user's input): exit 1."""


def raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_digest(checksums: dict[str, str] = MNIST_MD5) -> str:
    """One short digest for the whole dataset, logged with the MLflow dataset input."""
    blob = "".join(f"{name}:{checksums[name]};" for name in sorted(checksums))
    return hashlib.md5(blob.encode()).hexdigest()[:8]


# Folders this process has verified (or written): the CLI, the grid driver and data.load all call
# prepare, and reading 55 MB for its MD5s each time is wasted once the files are known good.
_VERIFIED: set[tuple[Path, str]] = set()


def prepare(
    data_dir: str | os.PathLike,
    source: str | None = None,
    checksums: dict[str, str] = MNIST_MD5,
) -> Path:
    """Make <data_dir>/MNIST/raw hold the verified files; return that folder. Idempotent."""
    target = raw_dir(data_dir)
    key = (target.resolve(), dataset_digest(checksums))
    if key in _VERIFIED:
        return target
    missing = [name for name in checksums if not _is_verified(target / name, checksums[name])]
    if not missing:
        _VERIFIED.add(key)
        return target
    target.mkdir(parents=True, exist_ok=True)
    with host_lock("prepare", str(target.resolve())):
        # under the lock, a partial file is what a prepare killed outright left (SIGKILL, or SIGTERM
        # without a handler, runs no cleanup)
        for leftover in target.glob(".*.part"):
            leftover.unlink(missing_ok=True)
        missing = [name for name in missing if not _is_verified(target / name, checksums[name])]  # another did it
        if source:
            for name in missing:
                _install_from_source(source, name, target, checksums[name])
        elif missing:
            _download_with_torchvision(Path(data_dir))
            for name in missing:
                path = target / name
                if not path.exists():
                    raise DownloadError(f"torchvision finished but {path} is missing")
                got = md5_of(path)
                if got != checksums[name]:
                    raise DownloadError(f"{path}: MD5 of the downloaded content is {got}, expected {checksums[name]}")
    _VERIFIED.add(key)
    return target


def _is_verified(path: Path, expected_md5: str) -> bool:
    return path.is_file() and md5_of(path) == expected_md5


def _download_with_torchvision(root: Path) -> None:
    from torchvision.datasets import MNIST  # imported here: only the download path needs it

    try:
        for train in (True, False):
            MNIST(root=str(root), train=train, download=True)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
        raise DownloadError(
            f"downloading MNIST through torchvision failed ({exc}); without internet, pass "
            f"--source DIR_OR_URL (or set {SOURCE_ENV}) pointing at the four IDX files"
        ) from exc


def _install_from_source(source: str, name: str, target: Path, expected_md5: str) -> None:
    """Copy one file from the source (a .gz or plain), decompress, verify, then rename into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            origin = _open_source_file(source, name, out)
        got = md5_of(tmp)
        if got != expected_md5:
            raise DataError(f"{origin}: MD5 of the decompressed content is {got}, expected {expected_md5}")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the data is for whoever reads the folder
        os.replace(tmp, target / name)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_source_file(source: str, name: str, out) -> str:
    """Write the decompressed bytes of `name` from the source into `out`; return where they came from."""
    is_url = urllib.parse.urlparse(source).scheme in ("http", "https", "ftp", "file")
    tried = []
    for candidate in (f"{name}.gz", name):
        if is_url:
            location = source.rstrip("/") + "/" + candidate
            tried.append(location)
            try:
                stream = urllib.request.urlopen(location, timeout=60)
            except urllib.error.HTTPError as exc:
                if exc.code in (404, 410):  # not there: try the other name
                    continue
                raise DownloadError(f"{location}: the server answered HTTP {exc.code} {exc.reason}") from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, FileNotFoundError):  # a file:// URL that is not there
                    continue
                raise DownloadError(f"{location}: cannot download ({exc.reason})") from None
            except (TimeoutError, ConnectionError) as exc:
                raise DownloadError(f"{location}: cannot download ({exc})") from None
            except ValueError as exc:
                raise DataError(f"{source!r} is not a usable URL ({exc})") from None
        else:
            location = str(Path(source) / candidate)
            tried.append(location)
            if not os.path.isfile(location):
                continue
            stream = open(location, "rb")
        with stream:
            # a connection closed early reads as a short (or broken .gz) file: its Content-Length says otherwise
            cut = DownloadError(f"{location}: the transfer was cut short (bytes of the announced length never came)")
            try:
                if candidate.endswith(".gz"):
                    with gzip.GzipFile(fileobj=stream) as gz:
                        _copy(gz, out, location, is_url)
                else:
                    _copy(stream, out, location, is_url)
            except DataError:
                if _unread(stream, is_url):
                    raise cut from None
                raise
            if _unread(stream, is_url):
                raise cut
        return location
    raise DataError(f"MNIST file {name} not found in source: tried {', '.join(tried)}")


def _unread(stream, is_url: bool) -> bool:
    """Whether a download's stream still owes bytes of the length its server announced."""
    return is_url and bool(getattr(stream, "length", None))


def _copy(stream, out, location: str, is_url: bool) -> None:
    """Copy stream into out, each failure blamed on its cause: a transfer cut short or stalled is the
    network's (DownloadError, exit 1); bytes that cannot be read or decompressed are the source's
    (DataError, exit 2); a write that fails (a full disk, a read-only folder) is this machine's, and
    its OSError goes on as it is."""
    import http.client

    while True:
        try:
            chunk = stream.read(1 << 20)
        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            if not is_url:
                raise DataError(f"{location}: cannot read ({exc})") from exc
            raise DownloadError(f"{location}: the transfer was cut short or stalled ({exc!r})") from exc
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a truncated .gz an EOFError
            raise DataError(f"{location}: cannot read ({exc})") from exc
        if not chunk:
            return
        out.write(chunk)


def read_idx(path: Path) -> np.ndarray:
    """Read an (uncompressed) IDX file of unsigned bytes: magic 0x00000803 images, 0x00000801 labels."""
    data = path.read_bytes()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but the file holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


@dataclass(frozen=True)
class Mnist:
    """The whole dataset as tensors on one device: x normalized float (N, 784), y int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    digest: str  # of the verified checksums: the MLflow dataset digest
    location: str  # the folder the tensors were read from
    input_sq_mean: float  # E[x^2] over the training images, the theory's input statistic
    input_var_mean: float  # each pixel's variance over the training images, averaged: BatchNorm's input statistic


def load(
    data_dir: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype | None = None,
    source: str | None = None,
) -> Mnist:
    """Prepare if needed, then move all of MNIST to the device once as normalized tensors."""
    import torch

    dtype = dtype or torch.float32
    folder = prepare(data_dir, source)

    def images(name: str) -> torch.Tensor:
        pixels = torch.from_numpy(read_idx(folder / name).reshape(-1, 28 * 28).copy()).to(device)
        return pixels.to(dtype).div_(255.0).sub_(MEAN).div_(STD)  # in place: one float copy at peak

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(folder / name).astype(np.int64)).to(device)

    x_train = images("train-images-idx3-ubyte")
    return Mnist(
        x_train=x_train,
        y_train=labels("train-labels-idx1-ubyte"),
        x_test=images("t10k-images-idx3-ubyte"),
        y_test=labels("t10k-labels-idx1-ubyte"),
        digest=dataset_digest(),
        location=str(folder.resolve()),
        input_sq_mean=float(torch.linalg.vector_norm(x_train) ** 2 / x_train.numel()),
        input_var_mean=float(x_train.var(dim=0, correction=0).mean()),
    )
