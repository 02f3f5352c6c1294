"""Named datasets: `pocketlm data pull NAME`, and `dataset:NAME/FILE` wherever a recipe, a pipeline or a command
takes a data file.

Each file has a canonical public URL and a sha256 (datasets.json, made from the provenance of the copies in
../shared/data by scripts/dataset_registry.py). A file is taken from, in order:

1. a local mirror: the folder POCKETLM_DATASETS names, laid out as FOLDER/FILE (as ../shared/data is);
2. the cache (~/.cache/pocketlm/datasets/FOLDER/FILE), where earlier downloads went;
3. its URL, into the cache: a partial download (FILE.part) resumes where it stopped.

Whatever the source, the bytes must have the registry's sha256; a mismatch is an error and a bad download is
removed. POCKETLM_DATASETS_URL replaces every URL's `https://raw.githubusercontent.com` host (a local server in
the tests, or a company mirror).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache
from importlib.resources import files as package_files
from pathlib import Path
from typing import Callable

from .errors import PocketLMError
from .fsio import file_sha256
from .paths import cache_dir

PREFIX = "dataset:"
MIRROR_ENV = "POCKETLM_DATASETS"
URL_ENV = "POCKETLM_DATASETS_URL"
GITHUB_RAW = "https://raw.githubusercontent.com"


class DatasetError(PocketLMError):
    """A dataset that cannot be had: unknown name or file, a failed download, or bytes that do not match."""


@dataclass(frozen=True)
class DataFile:
    dataset: str
    folder: str
    name: str  # its path under the folder
    url: str | None  # None: published only inside a package (`source` says where), so only a mirror has it
    sha256: str
    size: int
    source: str = ""


@cache
def registry() -> dict[str, dict]:
    return json.loads(package_files("pocketlm").joinpath("datasets.json").read_text())["datasets"]


def is_dataset_ref(text: str) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


def data_file(ref: str) -> DataFile:
    """The registry's record of `dataset:NAME/FILE`; an unknown name or file is refused with what there is."""
    body = ref[len(PREFIX):] if is_dataset_ref(ref) else ref
    name, _, path = body.partition("/")
    datasets = registry()
    if name not in datasets:
        raise DatasetError(f"{ref}: unknown dataset {name!r}; known: {', '.join(sorted(datasets))} "
                           "(`pocketlm data list`)")
    entry = datasets[name]
    if path not in entry["files"]:
        shown = sorted(entry["files"])
        more = f", ... ({len(shown)} files)" if len(shown) > 8 else ""
        raise DatasetError(f"{ref}: {name} has no file {path!r}; its files: {', '.join(shown[:8])}{more}")
    record = entry["files"][path]
    return DataFile(name, entry["folder"], path, record["url"], record["sha256"], record["size"],
                    record.get("source", ""))


def dataset_files(name: str) -> list[DataFile]:
    if name not in registry():
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(registry()))}")
    return [data_file(f"{PREFIX}{name}/{path}") for path in sorted(registry()[name]["files"])]


def resolve_data_path(ref: str, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The local path of `dataset:NAME/FILE` (fetched when it is not here yet); any other text is returned as a
    path unchanged."""
    if not is_dataset_ref(ref):
        return Path(ref)
    return fetch(data_file(ref), progress)


def fetch(item: DataFile, progress: Callable[[str, int, int], None] | None = None) -> Path:
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        local = Path(mirror) / item.folder / item.name
        if local.is_file():
            _verify(local, item, f"the mirror {MIRROR_ENV}={mirror}")
            return local
    target = cache_dir() / "datasets" / item.folder / item.name
    if target.is_file() and target.stat().st_size == item.size:
        return target  # verified when it was downloaded; re-hashing every use would slow every run
    _download(item, target, progress)
    return target


def url_of(item: DataFile) -> str:
    if item.url is None:
        raise DatasetError(f"{PREFIX}{item.dataset}/{item.name} has no download URL ({item.source or 'no source'}); "
                           f"set {MIRROR_ENV} to a folder that holds {item.folder}/{item.name}")
    base = os.environ.get(URL_ENV)
    if base and item.url.startswith(GITHUB_RAW):
        return base.rstrip("/") + item.url[len(GITHUB_RAW):]
    return item.url


def _download(item: DataFile, target: Path, progress) -> None:
    url = url_of(item)
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not os.environ.get(URL_ENV):
        raise DatasetError(f"{PREFIX}{item.dataset}/{item.name}: not in the cache and HF_HUB_OFFLINE=1 forbids "
                           f"downloading; set {MIRROR_ENV} to a folder laid out as {item.folder}/{item.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > item.size:
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"User-Agent": "pocketlm", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # the server ignored the range: start again
                have = 0
            with open(part, "ab" if have else "wb") as out:
                done = have
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(item.name, done, item.size)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DatasetError(f"{PREFIX}{item.dataset}/{item.name}: downloading {url} failed ({reason}); run again to "
                           f"resume, or set {MIRROR_ENV} to a local copy laid out as {item.folder}/{item.name}") from None
    try:
        _verify(part, item, url)
    except DatasetError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)


def _verify(path: Path, item: DataFile, source: str) -> None:
    size = path.stat().st_size
    digest = file_sha256(path) if size == item.size else None
    if digest != item.sha256:
        got = f"sha256 {digest}" if digest else f"{size} bytes, not {item.size}"
        raise DatasetError(f"{PREFIX}{item.dataset}/{item.name} from {source}: checksum mismatch ({got}; expected "
                           f"sha256 {item.sha256}); the file is not the published one")


def pull(name: str, progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Every file of dataset `name`, fetched where needed; their local paths."""
    return [fetch(item, progress) for item in dataset_files(name)]


def by_folder(relative: str) -> Path | None:
    """A path in ../shared/data's layout (FOLDER or FOLDER/FILE) from the named dataset kept in FOLDER, fetched
    where needed; None when no dataset lives in FOLDER."""
    folder, _, rest = relative.strip("/").partition("/")
    name = next((n for n, entry in registry().items() if entry["folder"] == folder), None)
    if name is None:
        return None
    if rest:
        return fetch(data_file(f"{PREFIX}{name}/{rest}"))
    paths = pull(name)
    return Path(os.path.commonpath([str(p) for p in paths])) if len(paths) > 1 else paths[0].parent


def describe() -> list[tuple[str, int, int, str]]:
    """(name, files, bytes, about) of every dataset."""
    return [(name, len(entry["files"]), sum(f["size"] for f in entry["files"].values()), entry.get("about", ""))
            for name, entry in sorted(registry().items())]


def ref_sha256(ref: str) -> str:
    """The published sha256 of `dataset:NAME/FILE`, or for `dataset:NAME` one over all its files' (nothing is
    fetched); an unknown dataset or file is refused."""
    body = ref[len(PREFIX):]
    if "/" in body:
        return data_file(ref).sha256
    import hashlib

    return hashlib.sha256("".join(f"{f.name}\0{f.sha256}\n" for f in dataset_files(body)).encode()).hexdigest()


__all__ = ["DataFile", "DatasetError", "data_file", "dataset_files", "describe",
           "by_folder", "fetch", "is_dataset_ref", "pull", "ref_sha256", "resolve_data_path"]
