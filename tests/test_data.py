import gzip
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import data
from pipeline.cli import cli
from tests.conftest import SHARED_MNIST, require_mnist, write_idx


def test_prepare_from_folder_decompresses_and_verifies(idx_source, tmp_path):
    source, checksums = idx_source
    folder = data.prepare(tmp_path / "d", str(source), checksums)
    assert folder == tmp_path / "d" / "MNIST" / "raw"
    for name, md5 in checksums.items():
        assert data.md5_of(folder / name) == md5
    assert data.read_idx(folder / "train-images-idx3-ubyte").shape == (32, 28, 28)


def test_prepare_is_idempotent(idx_source, tmp_path):
    source, checksums = idx_source
    folder = data.prepare(tmp_path / "d", str(source), checksums)
    stamp = os.stat(folder / "t10k-labels-idx1-ubyte").st_mtime_ns
    for f in source.iterdir():  # a second prepare must not even read the source
        f.unlink()
    data.prepare(tmp_path / "d", str(source), checksums)
    assert os.stat(folder / "t10k-labels-idx1-ubyte").st_mtime_ns == stamp


def test_prepare_from_file_url(idx_source, tmp_path):
    source, checksums = idx_source
    folder = data.prepare(tmp_path / "d", source.as_uri(), checksums)
    assert sorted(p.name for p in folder.iterdir()) == sorted(checksums)


def test_corrupt_file_names_file_and_checksum_and_leaves_nothing(idx_source, tmp_path):
    source, checksums = idx_source
    write_idx(source / "t10k-labels-idx1-ubyte", np.full(8, 3))  # wrong content, plain file
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.*expected " + checksums["t10k-labels-idx1-ubyte"]):
        data.prepare(tmp_path / "d", str(source), checksums)
    leftovers = [p.name for p in (tmp_path / "d" / "MNIST" / "raw").iterdir()]
    assert "t10k-labels-idx1-ubyte" not in leftovers
    assert not [n for n in leftovers if n.endswith(".part")]


def test_truncated_gzip_is_an_error_naming_the_file(idx_source, tmp_path):
    source, checksums = idx_source
    gz = source / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:100])
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        data.prepare(tmp_path / "d", str(source), checksums)
    assert not list((tmp_path / "d" / "MNIST" / "raw").glob("*.part"))


def test_missing_file_names_what_was_tried(idx_source, tmp_path):
    source, checksums = idx_source
    (source / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte not found"):
        data.prepare(tmp_path / "d", str(source), checksums)


def test_read_idx_rejects_a_bad_header(tmp_path):
    (tmp_path / "f").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(data.DataError, match="header says shape"):
        data.read_idx(tmp_path / "f")


def test_cli_prepare_real_mnist_from_offline_copy(tmp_path):
    require_mnist()
    result = CliRunner().invoke(cli, ["prepare", "--data-dir", str(tmp_path), "--source", str(SHARED_MNIST)])
    assert result.exit_code == 0, result.output
    raw = tmp_path / "MNIST" / "raw"
    assert {p.name for p in raw.iterdir()} == set(data.MNIST_MD5)
    # The training images of the offline copy were re-compressed: the decompressed content counts.
    with gzip.open(SHARED_MNIST / "train-images-idx3-ubyte.gz") as f:
        assert f.read(16) == (raw / "train-images-idx3-ubyte").read_bytes()[:16]


def test_cli_prepare_source_from_environment(tmp_path, idx_source, monkeypatch):
    monkeypatch.setenv(data.SOURCE_ENV, str(tmp_path / "nowhere"))
    result = CliRunner().invoke(cli, ["prepare", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "--source" in result.output and "nowhere" in result.output


def test_cli_prepare_wrong_checksum_exits_2(idx_source, tmp_path):
    source, _ = idx_source  # tiny files: their content is not MNIST's
    result = CliRunner().invoke(cli, ["prepare", "--data-dir", str(tmp_path / "d"), "--source", str(source)])
    assert result.exit_code == 2
    assert "MD5" in result.output and "expected" in result.output


def test_loaded_tensors_are_normalized_and_complete(mnist):
    assert mnist.x_train.shape == (60_000, 784) and mnist.x_test.shape == (10_000, 784)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert abs(mnist.x_train.mean().item()) < 1e-3
    assert abs(mnist.x_train.std().item() - 1.0) < 1e-3
    assert set(mnist.y_test.unique().tolist()) == set(range(10))


def test_failed_download_exits_1_and_says_how_to_work_offline(tmp_path, monkeypatch):
    """The real torchvision download path, pointed at a closed port on this machine."""
    from torchvision.datasets import MNIST

    from tests.conftest import free_port

    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{free_port()}/"])
    monkeypatch.delenv(data.SOURCE_ENV, raising=False)
    result = CliRunner().invoke(cli, ["prepare", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 1, result.output
    assert "downloading MNIST through torchvision failed" in result.output and "--source" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("answer, exit_code, message", [
    (500, 1, "the server answered HTTP 500"),  # the server's trouble: a failing environment
    (503, 1, "HTTP 503"),
    (404, 2, "not found in source"),  # nothing at that URL: the user's input
    (None, 1, "cannot download"),  # nobody listening: connection refused
])
def test_a_source_url_that_fails_says_what_the_server_did(answer, exit_code, message, tmp_path):
    """--source http://...: a real HTTP server on this machine answering `answer` to every request
    (None: a closed port). A download failure exits 1 and names what the server did; only a 404 is
    'not found' (exit 2). Nothing is left in the data folder."""
    import http.server
    import threading

    from tests.conftest import free_port

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(answer)

        def log_message(self, *args):
            pass

    port = free_port()
    server = None
    if answer is not None:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = CliRunner().invoke(cli, ["prepare", "--data-dir", str(tmp_path / "d"),
                                          "--source", f"http://127.0.0.1:{port}/mnist"])
    finally:
        if server is not None:
            server.shutdown()
    assert result.exit_code == exit_code, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    raw = tmp_path / "d" / "MNIST" / "raw"
    assert not raw.exists() or not any(raw.iterdir())  # no half-written file


def test_prepare_sweeps_what_a_killed_prepare_left_and_writes_files_others_can_read(idx_source, tmp_path):
    """A prepare killed outright leaves its hidden .part file (no cleanup runs): the next one removes
    it. The files are readable by everyone who can read the folder (mkstemp made them private)."""
    source, checksums = idx_source
    target = tmp_path / "d" / "MNIST" / "raw"
    target.mkdir(parents=True)
    leftover = target / ".train-images-idx3-ubyte.abc123.part"
    leftover.write_bytes(b"x" * 1000)
    old = os.umask(0o022)
    try:
        data.prepare(tmp_path / "d", str(source), checksums)
    finally:
        os.umask(old)
    assert sorted(p.name for p in target.iterdir()) == sorted(checksums)
    assert all((target / name).stat().st_mode & 0o777 == 0o644 for name in checksums)


def test_a_full_disk_is_the_machines_fault_not_the_sources(idx_source):
    """Writing to /dev/full fails with ENOSPC: that OSError goes on (the CLI says 'No space left on
    device', exit 1) instead of a DataError that blames --source (exit 2)."""
    import errno

    source, _ = idx_source
    with open("/dev/full", "wb", buffering=0) as out, pytest.raises(OSError) as found:
        data._open_source_file(str(source), "train-images-idx3-ubyte", out)
    assert found.value.errno == errno.ENOSPC and not isinstance(found.value, data.DataError)


def test_a_download_cut_short_is_the_networks_fault(tmp_path):
    """A server that promises 1,000,000 bytes and closes after 1,000: a DownloadError (exit 1) that
    says the transfer was cut short, not a DataError about the file's content."""
    import http.server
    import threading

    class Cut(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.endswith(".gz"):  # only the plain file is there
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/mnist"
        with open(tmp_path / "out", "wb") as out, pytest.raises(data.DownloadError, match="cut short"):
            data._open_source_file(url, "train-labels-idx1-ubyte", out)
    finally:
        server.shutdown()
