"""Named datasets: the registry agrees with the copies in ../shared/data, a download from a local HTTP server lands
in the cache checked against its sha256, a partial download resumes with a Range request, a wrong byte is an error
that leaves nothing behind, a local mirror is used offline, and an unknown name is one line."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pocketlm.datasets import DatasetError, data_file, dataset_files, pull, registry, resolve_data_path
from pocketlm.fsio import file_sha256

REPO = Path(__file__).resolve().parent.parent


def test_registry_matches_every_shared_file(shared_data):
    """Every file the registry names is in ../shared/data with its size and sha256, and every file there is named:
    the mirror layout and the published hashes agree."""
    named = set()
    for name, entry in registry().items():
        for path, record in entry["files"].items():
            local = shared_data / entry["folder"] / path
            assert local.stat().st_size == record["size"], local
            assert file_sha256(local) == record["sha256"], local
            assert (record["url"] or "").startswith("https://raw.githubusercontent.com/") or record["source"], path
            named.add(local)
    on_disk = {p for p in shared_data.rglob("*") if p.is_file() and p.name != "SOURCES.md"}
    assert on_disk == named
    assert {"tinyshakespeare", "tinystories", "wikitext2", "gsm8k", "mmlu", "arc", "cranfield", "alpaca"} <= set(registry())


class Server:
    """Serves a folder laid out as the URLs' paths (REPO/COMMIT/PATH), honouring Range requests; records them."""

    def __init__(self, root: Path):
        self.root, self.ranges, self.corrupt = root, [], False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                if server.corrupt:
                    body = body[:-1] + bytes([body[-1] ^ 1])
                start = 0
                wanted = self.headers.get("Range")
                server.ranges.append(wanted)
                if wanted:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(tmp_path, shared_data, monkeypatch):
    """The cranfield, tinyshakespeare and wikitext2 files served at their URLs' paths; an empty cache; no mirror."""
    root = tmp_path / "www"
    for name in ("cranfield", "tinyshakespeare", "wikitext2"):
        for item in dataset_files(name):  # every one has a GitHub URL
            target = root / item.url.removeprefix("https://raw.githubusercontent.com/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((shared_data / item.folder / item.name).read_bytes())
    serving = Server(root)
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POCKETLM_DATASETS_URL", serving.url)
    monkeypatch.delenv("POCKETLM_DATASETS", raising=False)
    yield serving
    serving.httpd.shutdown()


def test_pull_downloads_into_the_cache_checked(server, shared_data, tmp_path):
    paths = pull("cranfield")
    assert [p.name for p in paths] == ["cran.all.1400", "cran.qry", "cranqrel", "cranqrel.readme"]
    for path in paths:
        assert path.is_relative_to(tmp_path / "cache" / "datasets" / "cranfield")
        assert path.read_bytes() == (shared_data / "cranfield" / path.name).read_bytes()
    requests = len(server.ranges)
    assert pull("cranfield") == paths and len(server.ranges) == requests  # cached: nothing fetched again


def test_a_partial_download_resumes(server, shared_data, tmp_path):
    item = data_file("dataset:tinyshakespeare/input.txt")
    whole = (shared_data / "tinyshakespeare" / "input.txt").read_bytes()
    part = tmp_path / "cache" / "datasets" / "tinyshakespeare" / "input.txt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(whole[:400_000])  # an earlier download stopped here
    path = resolve_data_path("dataset:tinyshakespeare/input.txt")
    assert server.ranges == ["bytes=400000-"]
    assert path.read_bytes() == whole and file_sha256(path) == item.sha256 and not part.exists()


def test_a_checksum_mismatch_is_an_error_and_leaves_nothing(server, tmp_path):
    server.corrupt = True
    with pytest.raises(DatasetError, match=r"dataset:tinyshakespeare/input.txt from http://127.0.0.1:\d+/karpathy/"
                                           r"char-rnn/.*: checksum mismatch \(sha256 [0-9a-f]{64}; expected sha256 86c4e6"):
        resolve_data_path("dataset:tinyshakespeare/input.txt")
    assert not list((tmp_path / "cache" / "datasets").rglob("*.txt*"))


def test_the_mirror_is_used_and_checked(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_DATASETS", str(shared_data))
    monkeypatch.setenv("POCKETLM_DATASETS_URL", "http://127.0.0.1:9")  # nothing listens: a fetch would fail
    assert resolve_data_path("dataset:arc/ARC-Challenge-Dev.jsonl") == shared_data / "arc_raw" / "ARC-Challenge-Dev.jsonl"
    bad = tmp_path / "mirror" / "arc_raw"
    bad.mkdir(parents=True)
    (bad / "ARC-Challenge-Dev.jsonl").write_text("{}\n")
    monkeypatch.setenv("POCKETLM_DATASETS", str(tmp_path / "mirror"))
    with pytest.raises(DatasetError, match="checksum mismatch"):
        resolve_data_path("dataset:arc/ARC-Challenge-Dev.jsonl")


def test_unknown_names_are_one_line():
    with pytest.raises(DatasetError, match=r"dataset:tinystorys/x.txt: unknown dataset 'tinystorys'; known: alpaca, "):
        data_file("dataset:tinystorys/x.txt")
    with pytest.raises(DatasetError, match=r"dataset:tinystories/train.txt: tinystories has no file 'train.txt'; its "
                                           r"files: tinystories_sample.txt, "):
        data_file("dataset:tinystories/train.txt")


def test_cli_pull_and_list(server, tmp_path):
    env = {**os.environ}
    done = subprocess.run([sys.executable, "-m", "pocketlm", "data", "pull", "tinyshakespeare"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "cache" / "datasets" / "tinyshakespeare")
    listed = subprocess.run([sys.executable, "-m", "pocketlm", "data", "list"], capture_output=True, text=True, env=env)
    assert any(line.startswith("cranfield ") for line in listed.stdout.splitlines())
    wrong = subprocess.run([sys.executable, "-m", "pocketlm", "data", "pull", "tinystorys"], capture_output=True,
                           text=True, env=env)
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "unknown dataset 'tinystorys'" in wrong.stderr


def test_prepare_and_recipes_take_dataset_refs(shared_data, monkeypatch):
    from pocketlm.data import resolve_inputs
    from pocketlm.train.recipe import DataSpec

    monkeypatch.setenv("POCKETLM_DATASETS", str(shared_data))
    assert resolve_inputs(["dataset:tinyshakespeare/input.txt"]) == [str(shared_data / "tinyshakespeare" / "input.txt")]
    assert len(resolve_inputs(["dataset:cranfield"])) == 4
    spec = DataSpec(source="dataset:tinystories/tinystories_sample.txt")
    assert spec.sources() == [str(shared_data / "tinystories" / "tinystories_sample.txt")]
    assert spec.source == "dataset:tinystories/tinystories_sample.txt"  # the recipe records the name, not the path


def test_builtin_tasks_fetch_their_data_without_the_shared_copy(server, tmp_path, shared_data, monkeypatch):
    from pocketlm.evaluate.loaders import resolve_tasks

    monkeypatch.setenv("POCKETLM_SHARED_DATA", str(tmp_path / "no-shared-copy"))
    (task,) = resolve_tasks(["wikitext2"])
    assert Path(task.text_path) == tmp_path / "cache" / "datasets" / "wikitext2" / "test.txt"
    assert Path(task.text_path).read_bytes() == (shared_data / "wikitext2" / "test.txt").read_bytes()
