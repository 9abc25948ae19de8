"""Writing outputs without ever losing what is there: checks before any work, atomic installs.

- `check_file_output` / `check_dir_output`: is a path a place we may write (or replace), said
  before any loading or quantizing, so a bad `--out` or `--json` fails in a second, not after
  the work. A directory output may only ever replace one of ours (`is_ours`), never a user's
  directory or file.
- `install_dir`: moves a finished temporary directory into place. Without overwrite the target
  must still be absent at the moment of the rename (renameat2's RENAME_NOREPLACE on Linux), so
  a directory that appears meanwhile is never renamed away; with overwrite, the old one is
  moved aside, checked to be ours again, replaced, and only then removed. An error at any step
  puts the old one back.
- `remove_debris`: the hidden `.NAME.partial-PID` / `.NAME.old-PID` siblings that a killed
  process (kill -9 cannot be caught) leaves behind are removed by the next write to the same
  target once their process is gone; an `.old-PID` whose target is missing is the previous
  output, and is put back instead.
- `file_digests` / `verify_digests` / `json_checksum`: what a written output records of itself,
  so damage (or a hand edit) is named when it is read back.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


class OutputError(ValueError):
    """An output path cannot be written or replaced; the message names the path and the fix."""


class OutputExistsError(FileExistsError):
    """The output exists and may not be replaced (no overwrite, or it is not ours)."""


def _writable_dir(path: Path, what: str) -> None:
    """The nearest existing ancestor of the output `path` must be a directory we can create
    entries in (the messages name `path`, the value the user gave)."""
    anc = path.parent
    while not os.path.lexists(anc):
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{what} {path}: {anc} is a file, not a directory; choose another "
                          "path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: no permission to write in {anc}; choose a "
                          "writable directory")


def check_file_output(path, *, what: str = "--json") -> Path:
    """A file we are about to write (and replace, if it is a file): not a directory, its
    directory writable."""
    p = Path(path).absolute()
    if p.is_dir():
        raise OutputError(f"{what} {p} is a directory; give a file name (e.g. {p}/out.json)")
    if os.path.lexists(p) and not p.is_file():
        raise OutputError(f"{what} {p} exists and is not a regular file; choose another path")
    if p.is_file() and not os.access(p, os.W_OK):
        raise OutputError(f"{what} {p} is not writable; choose another path")
    _writable_dir(p, what)
    return p


def check_dir_output(path, *, overwrite: bool, is_ours: Callable[[Path], bool],
                     kind: str = "an any4 checkpoint", what: str = "--out") -> Path:
    """A directory we are about to create (or, with overwrite, replace): refused if it exists
    and overwrite is off, if it is not a directory, or if it is not one of ours."""
    p = Path(path).absolute()
    if os.path.lexists(p):
        if p.is_symlink() or not p.is_dir():
            raise OutputExistsError(f"{what} {p} exists and is not a directory; it is left as "
                                    "it is. Choose another path")
        if not is_ours(p):
            raise OutputExistsError(f"{what} {p} exists and is not {kind}; it is left as it "
                                    f"is (overwrite only ever replaces {kind}). Choose another "
                                    "path")
        if not overwrite:
            raise OutputExistsError(f"{what} {p} exists ({kind}); pass --overwrite "
                                    "(overwrite=True) to replace it, or choose another path")
    _writable_dir(p, what)
    return p


def sibling(final: Path, tag: str, pid: int | None = None) -> Path:
    """The hidden sibling `.NAME.TAG-PID` of `final` (tag: "partial" or "old")."""
    return final.parent / f".{final.name}.{tag}-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_debris(final: Path, *, is_ours: Callable[[Path], bool]) -> list[str]:
    """Cleans the siblings of `final` left by processes that are gone; returns what it did."""
    done = []
    if not final.parent.is_dir():
        return done
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(partial|old)-(\d+)$")
    for entry in sorted(final.parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or int(m[2]) == os.getpid() or _alive(int(m[2])):
            continue
        if m[1] == "old" and not os.path.lexists(final) and is_ours(entry):
            os.rename(entry, final)  # the process died between moving it aside and replacing
            done.append(f"restored {final} from {entry.name}")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry.name}")
    return done


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(src, dst) that fails with FileExistsError if dst exists at that moment."""
    if sys.platform.startswith("linux"):
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
        if fn is not None:
            r = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
            if r == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, "appeared while we were writing", str(dst))
            if err not in (errno.EINVAL, errno.ENOSYS):  # a filesystem without the flag
                raise OSError(err, os.strerror(err), str(dst))
    # elsewhere: rename(2) replaces only an empty directory; this narrows the window to it
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "appeared while we were writing", str(dst))
    os.rename(src, dst)


def install_dir(tmp: Path, final: Path, *, overwrite: bool,
                is_ours: Callable[[Path], bool], kind: str = "an any4 checkpoint") -> None:
    """Moves the complete directory `tmp` to `final` (see the module docstring)."""
    if not os.path.lexists(final):
        try:
            rename_noreplace(tmp, final)
        except FileExistsError:
            raise OutputExistsError(f"{final} appeared while this run was writing; it is left "
                                    "as it is and nothing was written. Choose another "
                                    "path") from None
        return
    if not overwrite:
        raise OutputExistsError(f"{final} exists; pass --overwrite (overwrite=True) to replace it")
    old = sibling(final, "old")
    os.rename(final, old)
    if old.is_symlink() or not old.is_dir() or not is_ours(old):  # replaced meanwhile
        os.rename(old, final)
        raise OutputExistsError(f"{final} is no longer {kind}; it is left as it is and nothing was "
                          "written")
    try:
        rename_noreplace(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old)


def remove_file_debris(path) -> list[str]:
    """Removes `PATH.partial-PID*` temporaries of processes that are gone (a file written
    atomically by a run that was killed)."""
    p = Path(path).absolute()
    done = []
    if not p.parent.is_dir():
        return done
    pattern = re.compile(rf"^{re.escape(p.name)}\.partial-(\d+)(\.\w+)?$")
    for entry in p.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])) and entry.is_file():
            entry.unlink()
            done.append(f"removed {entry.name}")
    return done


def atomic_write(path, data: bytes) -> None:
    """Writes `data` to `path` atomically: a temporary file in the same directory (created if
    missing), then a rename, so an interrupted run never leaves half a file (and an existing
    one stays whole). Temporaries of earlier runs that were killed are removed first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_file_debris(path)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_json(path, record: dict) -> None:
    """`record` as indented JSON, written with `atomic_write`."""
    atomic_write(path, json.dumps(record, indent=2, default=str).encode())


def file_digests(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (but `skip`), for `verify_digests`."""
    out = {}
    for d, _, files in os.walk(root):
        for f in sorted(files):
            full = Path(d) / f
            rel = full.relative_to(root).as_posix()
            if rel not in skip:
                out[rel] = sha256_file(full)
    return dict(sorted(out.items()))


def verify_digests(root: Path, digests: dict[str, str]) -> list[str]:
    """What differs from `digests`: each damaged or missing file, named."""
    problems = []
    for rel, want in digests.items():
        full = Path(root) / rel
        if not full.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(full) != want:
            problems.append(f"{rel} is damaged (its sha256 differs from the one recorded)")
    return problems


def json_checksum(obj: dict) -> str:
    """sha256 of a JSON object's canonical text (sorted keys), without its "checksum" key."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
