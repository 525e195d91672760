"""Sources, checksums and downloads. Downloads use a server on 127.0.0.1 (or a fake
opener); no test touches the network."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import urllib.request
from pathlib import Path

import pytest
from conftest import sha256_of, tar_folder

from amoc.config import DataConfig
from amoc.data import fetch
from amoc.errors import DataError


def one_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amoc download: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def small_archive(tmp_path, make_image_tree) -> Path:
    tree = make_image_tree(tmp_path / "tree", {"a": (3, 2), "b": (3, 2)})
    return tar_folder(tree, tmp_path / "small.tar.gz", "small")


# --------------------------------------------------------------------------- resolving sources
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_official_defaults(name):
    source = fetch.resolve(DataConfig(name=name))
    url, md5 = fetch.OFFICIAL[name]
    assert source.url == url and source.expected == {"md5": md5} and source.path is None
    assert url.startswith("https://www.cs.toronto.edu/~kriz/cifar-10")
    assert fetch.OFFICIAL["cifar10"][1] == "c58f30108f718f92721af3b95e74349a"
    assert fetch.OFFICIAL["cifar100"][1] == "eb9058c3a382ffc7106e4002c42a8d85"


def test_checksum_overrides_and_mirror():
    assert fetch.resolve(DataConfig(md5="A" * 32)).expected == {"md5": "a" * 32}
    both = fetch.resolve(DataConfig(source="https://mirror.example/c.tar.gz", md5="b" * 32, sha256="c" * 64))
    assert both.expected == {"md5": "b" * 32, "sha256": "c" * 64} and both.url == "https://mirror.example/c.tar.gz"


@pytest.mark.parametrize(
    "source, needle",
    [
        ("https://mirror.example/cifar.tar.gz", "is a custom archive without a checksum; set data.sha256"),
        ("archive.tar.gz", "is a custom archive without a checksum; set data.sha256"),
        ("missing.tar.gz", "missing.tar.gz does not exist"),
        ("ftp://host/x.tar.gz", "unsupported scheme ftp://"),
        ("file://somehost/x.tar.gz", "names host 'somehost'"),
    ],
)
def test_bad_sources(source, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "archive.tar.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=re.escape(needle)):
        fetch.resolve(DataConfig(source=source))


def test_folder_source_only_for_folder_name(tmp_path):
    with pytest.raises(DataError, match="needs the python-version archive"):
        fetch.resolve(DataConfig(source=str(tmp_path)))
    assert fetch.resolve(DataConfig(name="folder", source=str(tmp_path))).path == tmp_path


def test_file_url_and_relative_path_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.tar.gz").write_bytes(b"x")
    rel = fetch.resolve(DataConfig(source="x.tar.gz", md5="a" * 32))
    url = fetch.resolve(DataConfig(source=(tmp_path / "x.tar.gz").as_uri(), md5="a" * 32))
    assert rel.path == url.path == tmp_path / "x.tar.gz"


# --------------------------------------------------------------------------- local files
def test_wrong_checksum(tmp_path, small_archive, run_download):
    for key, wrong, algo in (("sha256", "cd" * 32, "sha256"), ("md5", "f" * 32, "md5")):
        code, _, err = run_download("data.name=folder", f"data.source={small_archive}", f"data.{key}={wrong}")
        actual = hashlib.new(algo, small_archive.read_bytes()).hexdigest()
        one_line(code, err, str(small_archive), f"{algo} mismatch", f"expected {wrong}", f"got {actual}")
        assert not (tmp_path / "prepared").exists()


def test_wrong_checksum_leaves_existing_output_folder_empty(tmp_path, small_archive, run_download):
    (tmp_path / "prepared").mkdir()
    code, _, err = run_download("data.name=folder", f"data.source={small_archive}", "data.md5=" + "ab" * 16)
    one_line(code, err, "md5 mismatch")
    assert list((tmp_path / "prepared").iterdir()) == []


def test_missing_local_file(run_download):
    one_line(*run_download("data.source=nope.tar.gz", "data.md5=" + "a" * 32)[::2], "does not exist")


def test_local_file_is_read_in_place(tmp_path, small_archive, run_download):
    code, _, err = run_download(
        "data.name=folder", f"data.source={small_archive}", f"data.sha256={sha256_of(small_archive)}"
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["stats.json", "test.npz", "train.npz"]


# --------------------------------------------------------------------------- downloads
class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        body, mode = self.routes.get(self.path, (None, None))
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "short":  # announce everything, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.routes = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_download(server, small_archive, run_download, tmp_path):
    _, base = server
    _Handler.routes["/small.tar.gz"] = (small_archive.read_bytes(), "full")
    code, out, err = run_download(
        "data.name=folder",
        f"data.source={base}/small.tar.gz",
        f"data.sha256={sha256_of(small_archive)}",
        "runtime.progress=true",
    )
    assert code == 0, err
    assert "6 train / 4 test" in out
    # only the outputs remain: the downloaded archive was a temp file
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["stats.json", "test.npz", "train.npz"]


def test_http_wrong_checksum(server, small_archive, run_download, tmp_path):
    _, base = server
    _Handler.routes["/small.tar.gz"] = (small_archive.read_bytes(), "full")
    code, _, err = run_download("data.name=folder", f"data.source={base}/small.tar.gz", "data.md5=" + "ab" * 16)
    one_line(code, err, f"{base}/small.tar.gz", "md5 mismatch")
    assert not (tmp_path / "prepared").exists()


def test_http_interrupted(server, small_archive, run_download, tmp_path):
    _, base = server
    _Handler.routes["/small.tar.gz"] = (small_archive.read_bytes(), "short")
    code, _, err = run_download(
        "data.name=folder", f"data.source={base}/small.tar.gz", f"data.sha256={sha256_of(small_archive)}"
    )
    one_line(code, err, "interrupted")
    assert not (tmp_path / "prepared").exists()


def test_http_404(server, run_download):
    _, base = server
    one_line(*run_download(f"data.source={base}/missing.tar.gz", "data.md5=" + "a" * 32)[::2], "HTTP 404")


class _FailingResponse:
    """A response that yields `good` bytes, then fails like a dropped connection."""

    def __init__(self, good: bytes, total: int, on_fail, error: BaseException) -> None:
        self.good, self.on_fail, self.error = good, on_fail, error
        self.headers = {"Content-Length": str(total)}

    def read(self, n: int) -> bytes:
        if self.good:
            chunk, self.good = self.good[:n], self.good[n:]
            return chunk
        self.on_fail()
        raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "error, code_expected", [(ConnectionResetError(104, "Connection reset by peer"), 2), (KeyboardInterrupt(), 130)]
)
def test_interrupted_stream_leaves_nothing(monkeypatch, run_download, tmp_path, error, code_expected):
    seen: list[list[str]] = []
    out = tmp_path / "prepared"

    def snapshot():  # what a crash at this moment would leave behind
        seen.append(sorted(p.name for p in out.rglob("*") if p.is_file()))

    def fake_urlopen(url, timeout):
        assert url == "https://mirror.example/c.tar.gz" and timeout == fetch.TIMEOUT_S
        return _FailingResponse(b"x" * (3 << 20), 10 << 20, snapshot, error)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    code, _, err = run_download("data.source=https://mirror.example/c.tar.gz", "data.md5=" + "a" * 32)
    assert code == code_expected
    if code == 2:
        one_line(code, err, "interrupted after 3145728 bytes", "Connection reset")
    # mid-download only the lock and a .part file existed; afterwards nothing at all
    assert seen == [[".amoc.lock", "c.tar.gz.part"]]
    assert not out.exists()
