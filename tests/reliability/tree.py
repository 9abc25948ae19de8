"""File-tree snapshots for the bad-input suite: a bad input must leave every file as it was.

    with unchanged(tmp_path), pytest.raises(ValueError, match="..."):
        call()

`snapshot(root)` is {relative path: (type, size, sha256)} of everything under `root`, hidden
entries (the `.NAME.partial-PID` / `.NAME.old-PID` siblings) included; a directory is
("dir", 0, ""), a symlink ("link", 0, its target). The root itself is "." so that its removal
or replacement by a file shows too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os


def _entry(path: str) -> tuple[str, int, str]:
    if os.path.islink(path):
        return ("link", 0, os.readlink(path))
    if os.path.isdir(path):
        return ("dir", 0, "")
    if os.path.isfile(path):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return ("file", os.path.getsize(path), h.hexdigest())
    return ("other", 0, "")


def snapshot(root) -> dict[str, tuple[str, int, str]]:
    """{relative path: (type, size, sha256)} of `root` and everything under it ({} if absent)."""
    root = os.fspath(root)
    if not os.path.lexists(root):
        return {}
    out = {".": _entry(root)}
    if out["."][0] != "dir":
        return out
    for d, dirs, files in os.walk(root):  # symlinks to directories are listed, not followed
        for name in dirs + files:
            full = os.path.join(d, name)
            out[os.path.relpath(full, root)] = _entry(full)
    return dict(sorted(out.items()))


def diff(before: dict, after: dict) -> list[str]:
    """What changed between two snapshots, one line per path."""
    lines = [f"removed {p}" for p in before if p not in after]
    lines += [f"added {p}" for p in after if p not in before]
    lines += [f"changed {p}: {before[p][:2]} -> {after[p][:2]}" for p in before
              if p in after and before[p] != after[p]]
    return lines


def assert_same(before: dict, after: dict, root="") -> None:
    changes = diff(before, after)
    assert not changes, f"the file tree under {root} changed: " + "; ".join(changes[:20])


@contextlib.contextmanager
def unchanged(*roots):
    """Asserts that nothing under any of `roots` was written, changed or deleted by the body."""
    before = [snapshot(r) for r in roots]
    yield
    for r, b in zip(roots, before, strict=True):
        assert_same(b, snapshot(r), r)


def debris(parent, name: str) -> list[str]:
    """The hidden `.NAME.partial-*` / `.NAME.old-*` siblings of `parent/name`."""
    prefix = f".{name}."
    return sorted(e for e in os.listdir(parent)
                  if e.startswith(prefix) and (".partial-" in e or ".old-" in e))


def dead_pid() -> int:
    """A process id that no process has now (for debris a killed process left behind)."""
    pid = 999_999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1
