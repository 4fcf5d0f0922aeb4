"""File helpers: canonical JSON, hashing, atomic writes, and output sets written all at once
(a lock per set, a commit journal, recovery of an interrupted write; docs/outputs.md)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ticketguard.errors import RunStateError


def canonical_json(obj: Any) -> str:
    """Serialise to canonical JSON: sorted keys, no insignificant whitespace, UTF-8 safe."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def sha256_hex(data: bytes | str) -> str:
    """Return the SHA-256 hex digest of bytes or of a string's UTF-8 encoding."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and writers that recreate the file) leave 0600; outputs get the usual mode.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write human-readable JSON (sorted keys, indented) to `path` atomically."""
    write_text_atomic(
        path, json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    )


# --- output sets: a lock per set, a commit journal, recovery -------------------------------------
#
# A command's outputs (sign: ticket, credential, secret; find: a round's ticket and the log; bench:
# its reports) form a set that must change all at once. POSIX renames one file atomically, not
# several, so a set is committed through a journal (docs/outputs.md):
#
#   1. every new file is written under a staging name beside its final name and fsynced;
#   2. a journal listing the staged -> final renames is written under a temporary name, fsynced
#      and renamed into place, and its directory fsynced: THE COMMIT POINT;
#   3. the renames are done (and their directories fsynced);
#   4. the journal is removed.
#
# A run that dies before (2) leaves the old set and staged/temporary files; one that dies after
# it leaves a journal. The next writer of the set, holding the set's lock, first rolls a journal
# forward (the renames are idempotent) and then removes the leftovers of the set's names.

JOURNAL_FORMAT = "ticketguard-journal/1"
#: The set name of an output directory (find's run folder, bench's output folder).
DIRECTORY_SET = "ticketguard"
#: A journal is tiny; anything larger is not one of ours.
MAX_JOURNAL_BYTES = 1 << 20

#: Called with the name of each step of a commit ("staged", "committed", "renamed 1", ...,
#: "renamed", "done"); tests set it to kill the process at an exact instant. None in use.
_STEP_HOOK: Callable[[str], None] | None = None

_STAGED = re.compile(r"^\.(?P<final>.+)\.[0-9a-f]{12}\.staged$")
#: Temporary files of `atomic_path`, `write_file_atomic` and the journal (mkstemp: 8 characters).
_TEMPORARY = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


def lock_file(key: Path) -> Path:
    """The lock file of the output set named by `key` (beside it)."""
    return key.with_name(f".{key.name}.lock")


def journal_file(key: Path) -> Path:
    """The commit journal of the output set named by `key` (beside it, while a commit runs)."""
    return key.with_name(f".{key.name}.journal")


def directory_key(directory: str | os.PathLike[str]) -> Path:
    """The key of an output directory's set: `.ticketguard.lock` and `.ticketguard.journal`."""
    return Path(directory) / DIRECTORY_SET


def staging_path(final: Path) -> Path:
    """A fresh staging name for `final`, in its folder: `.NAME.<12 hex>.staged`."""
    import secrets

    return final.with_name(f".{final.name}.{secrets.token_hex(6)}.staged")


def is_leftover(name: str) -> bool:
    """Whether a file name is a staging or temporary file this module (or its callers) makes."""
    if _STAGED.match(name):
        return True
    match = _TEMPORARY.match(name)
    return match is not None


def leftover_of(name: str) -> str | None:
    """The final file name a staging or temporary file name belongs to, else None.

    A temporary file of a staged file (`..NAME.<tag>.staged.<rand>.tmp`) belongs to NAME too.
    """
    for pattern in (_TEMPORARY, _STAGED):
        match = pattern.match(name)
        if match is not None:
            inner = match.group("final")
            return leftover_of(inner) or inner
    return None


def is_housekeeping(name: str) -> bool:
    """Whether a name in an output folder is a lock, a journal or a leftover of ours."""
    return (name.startswith(".") and name.endswith((".lock", ".journal"))) or is_leftover(name)


# --- the lock --------------------------------------------------------------------------------------


@dataclass
class _Held:
    fd: int
    path: Path
    count: int = 1
    prepared: bool = False


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def _identity(path: Path) -> str:
    return str(Path(os.path.realpath(path.parent)) / path.name)


def _holder_pid(fd: int) -> str:
    for _ in range(20):  # the holder writes its pid right after it gets the lock
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


def _missing_folders(folder: Path) -> list[Path]:
    """The folders above and at `folder` that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _acquire(path: Path, label: str, wait: bool) -> int:
    flags = (
        os.O_RDWR
        | os.O_CREAT
        | os.O_NONBLOCK  # a FIFO planted at the lock's name must not block the open
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_NOFOLLOW", 0)
    )
    while True:
        try:
            # Inside the loop: a run we waited for may have removed a folder it had made.
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise RunStateError(
                f"{path}: cannot open the lock file of {label} ({exc.strerror or exc})"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunStateError(f"{path}: the lock file of {label} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise RunStateError(
                f"{label} is being written by another ticketguard run (pid {pid})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The run we waited for may have removed the file (and another run made a new one): the
        # lock counts only if it is on the file that now has the name.
        try:
            named = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            os.close(fd)
            continue
        mine = os.fstat(fd)
        if (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError as exc:
            os.close(fd)
            raise RunStateError(
                f"{path}: cannot write the lock file of {label} ({exc.strerror or exc})"
            ) from None
        return fd


@contextlib.contextmanager
def output_lock(
    key: str | os.PathLike[str], *, label: str | None = None, wait: bool = False
) -> Iterator[_Held]:
    """Hold the lock of the output set `key` (`.KEY.lock` beside it) for the block.

    Another process holding it makes this refuse with one line naming its pid (or, with `wait`,
    wait for it). The lock is an flock(2), so the kernel drops it when its holder dies: it never
    goes stale. The lock file is removed on release; a run that got the lock on a file that was
    meanwhile removed tries again, so removing it never lets two runs in. Re-entrant within a
    process (a command holds it for its whole run, its writer takes it again to commit).
    """
    key = Path(key)
    path = lock_file(key)
    ident = _identity(path)
    with _held_guard:
        held = _held.get(ident)
        if held is not None:
            held.count += 1
    if held is not None:
        try:
            yield held
        finally:
            with _held_guard:
                held.count -= 1
        return
    made = _missing_folders(path.parent)
    fd = _acquire(path, label or str(key), wait)
    held = _Held(fd, path)
    with _held_guard:
        _held[ident] = held
    try:
        yield held
    finally:
        with _held_guard:
            _held.pop(ident, None)
        with contextlib.suppress(OSError):
            path.unlink()  # still ours: whoever opens the name from now on gets a new file
        os.close(fd)
        for folder in made:  # a run that wrote nothing leaves no new folder behind
            try:
                folder.rmdir()
            except OSError:
                break


# --- the journal -----------------------------------------------------------------------------------


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems cannot fsync a directory; files must be synced
            raise
    finally:
        os.close(fd)


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base)).replace(os.sep, "/")


def _inside(base: Path, text: Any) -> Path | None:
    """`base / text` when `text` is a relative path that stays below `base`, else None."""
    if not isinstance(text, str) or not text or text.startswith("/") or "\\" in text:
        return None
    parts = text.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\x00" in text:
        return None
    return base.joinpath(*parts)


def _read_journal(journal: Path) -> list[tuple[Path | None, Path]]:
    """Return a journal's renames (None: remove the final file); RunStateError if damaged."""
    from ticketguard.documents import read_json_file

    base = journal.parent
    doc = read_json_file(
        journal, what="commit journal", error=RunStateError, max_bytes=MAX_JOURNAL_BYTES
    )
    problem = f"{journal}: the commit journal of an interrupted write is damaged"
    advice = "; check the files it names, then delete it to go on"
    if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT:
        raise RunStateError(f"{problem} (not a {JOURNAL_FORMAT} document){advice}")
    renames = doc.get("renames")
    if not isinstance(renames, list) or doc.get("sha256") != sha256_hex(canonical_json(renames)):
        raise RunStateError(f"{problem} (its checksum does not match){advice}")
    entries: list[tuple[Path | None, Path]] = []
    for item in renames:
        if not isinstance(item, dict):
            raise RunStateError(f"{problem} (an entry is not an object){advice}")
        final = _inside(base, item.get("to"))
        staged = None if item.get("from") is None else _inside(base, item.get("from"))
        if final is None or (item.get("from") is not None and staged is None):
            raise RunStateError(f"{problem} (a path leaves its folder){advice}")
        # A staged file sits beside its final file under the staging name of that file only.
        if staged is not None and (
            staged.parent != final.parent or leftover_of(staged.name) != final.name
        ):
            raise RunStateError(f"{problem} ({item.get('from')!r} is not a staged file){advice}")
        entries.append((staged, final))
    return entries


def _write_journal(journal: Path, entries: Sequence[tuple[Path | None, Path]]) -> None:
    base = journal.parent
    outside = [f for _, f in entries if _relative(f, base).startswith("../")]
    if outside:  # recovery could not read such a journal back: refuse before the commit
        raise RunStateError(f"{outside[0]}: outside {base}, the folder of its output set")
    renames = [
        {"from": None if s is None else _relative(s, base), "to": _relative(f, base)}
        for s, f in entries
    ]
    doc = {
        "format": JOURNAL_FORMAT,
        "pid": os.getpid(),
        "renames": renames,
        "sha256": sha256_hex(canonical_json(renames)),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{journal.name}.", suffix=".tmp", dir=base)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write((json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, journal)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(base, directory=True)  # the commit point is durable from here


def _apply(journal: Path, entries: Sequence[tuple[Path | None, Path]]) -> None:
    """Do a committed journal's renames (idempotent: a missing staged file was renamed)."""
    folders: dict[str, Path] = {}
    for index, (staged, final) in enumerate(entries, 1):
        if staged is None:
            final.unlink(missing_ok=True)
        elif os.path.lexists(staged):
            os.replace(staged, final)
        folders[str(final.parent)] = final.parent
        _step(f"renamed {index}")
    for folder in folders.values():
        _fsync_path(folder, directory=True)
    _step("renamed")
    journal.unlink(missing_ok=True)
    _fsync_path(journal.parent, directory=True)


def _remove_leftovers(folder: Path, names: set[str] | None) -> list[Path]:
    """Remove staging and temporary files of `names` in `folder` (all of ours when None)."""
    removed: list[Path] = []
    try:
        listing = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in listing:
        owner = leftover_of(name)
        if owner is None or (names is not None and owner not in names):
            continue
        path = folder / name
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            if not path.is_dir() or path.is_symlink():
                path.unlink()
                removed.append(path)
    return removed


def _check_entries(
    journal: Path,
    entries: Sequence[tuple[Path | None, Path]],
    key: Path,
    members: Sequence[str | os.PathLike[str]] | None,
    folders: Sequence[str | os.PathLike[str]],
) -> None:
    """Refuse a journal that would touch anything but this set's own files.

    A journal is a plain file anyone who can write the folder could plant, so its checksum
    proves nothing: each rename must land on one of the set's members (or directly in one of
    its folders), in a real folder (no link leading elsewhere), on a regular file or nothing,
    from a regular staged file; only members may be deleted.
    """
    problem = f"{journal}: refused: the commit journal of an interrupted write"
    advice = "; check the files it names, then delete it to go on"
    if members is None:  # finishing by hand: the journal's names, in its own folder tree only
        base = os.path.realpath(key.parent)
        for _staged, final in entries:
            inner = os.path.relpath(os.path.abspath(final.parent), os.path.abspath(key.parent))
            if os.path.realpath(final.parent) != os.path.normpath(os.path.join(base, inner)):
                raise RunStateError(f"{problem} names {final} through a link{advice}")
            if os.path.lexists(final) and not stat.S_ISREG(os.lstat(final).st_mode):
                raise RunStateError(f"{problem} names {final}, which is not a regular file{advice}")
        return
    named = {os.path.abspath(m) for m in members}
    own = {os.path.abspath(f) for f in folders}
    real = {os.path.realpath(key.parent)} | {os.path.realpath(f) for f in folders}
    real |= {os.path.realpath(Path(m).parent) for m in members}
    for staged, final in entries:
        where = os.path.abspath(final)
        member = where in named
        if not member and (staged is None or os.path.dirname(where) not in own):
            raise RunStateError(f"{problem} names {final.name!r}, not a file of this set{advice}")
        if os.path.realpath(final.parent) not in real:
            raise RunStateError(f"{problem} names {final} through a link{advice}")
        if os.path.lexists(final) and not stat.S_ISREG(os.lstat(final).st_mode):
            raise RunStateError(f"{problem} names {final}, which is not a regular file{advice}")
        if staged is not None and os.path.lexists(staged):
            if not stat.S_ISREG(os.lstat(staged).st_mode):
                raise RunStateError(f"{problem}: {staged} is not a regular file{advice}")


def recover(
    key: str | os.PathLike[str],
    members: Sequence[str | os.PathLike[str]] | None = (),
    *,
    folders: Sequence[str | os.PathLike[str]] = (),
) -> list[str]:
    """Finish or undo an interrupted write of the set `key`; call it holding the set's lock.

    A journal (a commit that happened) is rolled forward; then the staging and temporary files
    of `members` (and of the journal) are removed, and every one of ours in each of `folders`.
    The journal may only touch `members` (and files directly in `folders`); `members=None`
    (finishing by hand) trusts the names it lists within its own folder tree.
    Return one line per thing done, for the caller to show.
    """
    key = Path(key)
    notes: list[str] = []
    journal = journal_file(key)
    if os.path.lexists(journal):
        entries = _read_journal(journal)
        _check_entries(journal, entries, key, members, folders)
        try:
            _apply(journal, entries)
        except OSError as exc:
            raise RunStateError(
                f"{journal}: cannot finish the interrupted write it records "
                f"({exc.strerror or exc}); check the files it names, then delete it to go on"
            ) from None
        notes.append(
            f"finished an interrupted write of {', '.join(str(f) for _, f in entries)} "
            f"(committed, not yet in place)"
        )
    by_folder: dict[Path, set[str] | None] = {key.parent: {journal.name, key.name}}
    for member in members or ():
        member = Path(member)
        names = by_folder.setdefault(member.parent, set())
        if names is not None:
            names.add(member.name)
    for folder in folders:
        by_folder[Path(folder)] = None
    removed = [p for folder, names in by_folder.items() for p in _remove_leftovers(folder, names)]
    if removed:
        notes.append(
            f"removed {len(removed)} staging/temporary file(s) of an interrupted write "
            f"({', '.join(p.name for p in removed[:3])}{', ...' if len(removed) > 3 else ''})"
        )
    return notes


@dataclass
class OutputSet:
    """The new files of one output set, staged until `commit` puts them all in place."""

    key: Path
    entries: list[tuple[Path | None, Path]] = field(default_factory=list)
    committed: bool = False

    def stage(self, final: str | os.PathLike[str]) -> Path:
        """Return the path to write the new content of `final` to (a staging name beside it)."""
        final = Path(final)
        if any(f == final for _, f in self.entries):
            raise ValueError(f"{final} is staged twice")
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = staging_path(final)
        self.entries.append((staged, final))
        return staged

    def remove(self, final: str | os.PathLike[str]) -> None:
        """Remove `final` as part of the commit (a file the new set does not have)."""
        final = Path(final)
        if not any(f == final for _, f in self.entries):
            self.entries.append((None, final))

    def unstage(self, final: str | os.PathLike[str]) -> None:
        """Drop `final` from the set (its staged file, if written, is removed)."""
        final = Path(final)
        for staged, _ in [e for e in self.entries if e[1] == final]:
            if staged is not None:
                staged.unlink(missing_ok=True)
        self.entries = [e for e in self.entries if e[1] != final]

    def discard(self) -> None:
        """Forget the staged files (before the commit point only)."""
        for staged, _ in self.entries:
            if staged is not None:
                staged.unlink(missing_ok=True)
        self.entries.clear()

    def commit(self) -> None:
        """Put every staged file in place at once (see the module notes); idempotent."""
        if self.committed:
            return
        for staged, final in self.entries:
            if staged is not None:
                if not staged.is_file():
                    raise RunStateError(f"{final}: its new content was never written")
                _fsync_path(staged)
        _step("staged")
        journal = journal_file(self.key)
        _write_journal(journal, self.entries)
        self.committed = True  # from here on the new set is the set; a crash rolls forward
        _step("committed")
        try:
            _apply(journal, self.entries)
        except OSError as exc:
            raise RunStateError(
                f"{self.entries[0][1]}: the new files are committed but could not all be put in "
                f"place ({exc.strerror or exc}); the next run on these outputs finishes it"
            ) from None
        _step("done")


@contextlib.contextmanager
def hold_outputs(
    key: str | os.PathLike[str],
    members: Sequence[str | os.PathLike[str]] | None = (),
    *,
    folders: Sequence[str | os.PathLike[str]] = (),
    label: str | None = None,
    wait: bool = False,
    notes: list[str] | None = None,
) -> Iterator[None]:
    """Hold the set's lock and first finish or undo any interrupted write of it (`recover`).

    The lines `recover` returns are appended to `notes` when given.
    """
    with output_lock(key, label=label, wait=wait):
        done = recover(key, members, folders=folders)
        if notes is not None:
            notes.extend(done)
        yield


@contextlib.contextmanager
def writing(
    key: str | os.PathLike[str],
    members: Sequence[str | os.PathLike[str]] = (),
    *,
    folders: Sequence[str | os.PathLike[str]] = (),
    label: str | None = None,
    wait: bool = False,
    notes: list[str] | None = None,
) -> Iterator[OutputSet]:
    """Write a new output set: stage files into the yielded set; all commit when the block ends.

    If the block raises, the staged files are removed and the old set stays as it was.
    """
    with hold_outputs(key, members, folders=folders, label=label, wait=wait, notes=notes):
        files = OutputSet(Path(key))
        try:
            yield files
        except BaseException:
            files.discard()
            raise
        try:
            files.commit()
        except BaseException:
            if not files.committed:
                files.discard()
            raise


# --- readers ---------------------------------------------------------------------------------------


def _journals_naming(path: Path) -> list[Path]:
    found = []
    target = os.path.abspath(path)
    for folder in dict.fromkeys([path.parent, path.parent.parent]):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if not (name.startswith(".") and name.endswith(".journal")):
                continue
            journal = folder / name
            try:
                entries = _read_journal(journal)
            except RunStateError:
                found.append(journal)  # damaged, but it may well be about this file
                continue
            if any(os.path.abspath(f) == target for _, f in entries):
                found.append(journal)
    return found


def pending_note(path: str | os.PathLike[str]) -> str | None:
    """One line if an interrupted write of the set `path` belongs to is pending, else None.

    For readers: until it is finished the set's files may be a mix of old and new ones.
    """
    path = Path(path)
    journals = _journals_naming(path)
    if not journals:
        return None
    return (
        f"{path}: an interrupted write of its output set is pending ({journals[0].name}); its "
        "files may mix old and new ones until it is finished: run the same command again, or "
        f"`python -m ticketguard.files finish {path}`"
    )


def settle(path: str | os.PathLike[str]) -> str | None:
    """Finish a pending interrupted write of the set `path` belongs to, if one is pending.

    For readers that may write: return None when nothing was pending or it was finished, else
    the one line of `pending_note` (read-only folder, the set being written right now, ...).
    """
    path = Path(path)
    for journal in _journals_naming(path):
        key = journal.with_name(journal.name[1 : -len(".journal")])
        try:
            with hold_outputs(key, None):
                pass
        except (RunStateError, OSError):
            return pending_note(path)
    return None


def _main(argv: Sequence[str]) -> int:
    """`python -m ticketguard.files finish PATH...`: finish the interrupted writes of PATHs."""
    import sys

    if len(argv) < 2 or argv[0] != "finish":
        print("usage: python -m ticketguard.files finish PATH...", file=sys.stderr)
        return 2
    status = 0
    for arg in argv[1:]:
        journals = _journals_naming(Path(arg))
        if not journals:
            print(f"{arg}: no interrupted write is pending")
        for journal in journals:
            key = journal.with_name(journal.name[1 : -len(".journal")])
            try:
                notes: list[str] = []
                with hold_outputs(key, None, notes=notes):
                    pass
            except (RunStateError, OSError) as exc:
                print(f"Error: {exc}", file=sys.stderr)
                status = 1
            else:
                for line in notes:
                    print(line)
    return status


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
