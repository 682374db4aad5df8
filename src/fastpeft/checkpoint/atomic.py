"""Crash-safe writing of an adapter folder: after a kill at any moment it holds the old files or the new ones.

An adapter is several files that must match each other (`adapter_config.json`, the weights, the model card).
Renaming them one by one over the old ones is not enough: a kill between two renames leaves new weights next
to an old config. So every save to a folder goes through one commit point:

1. stage: each new file is written into a hidden sibling folder `<dir>/.fastpeft-staging-XXXX/` under its
   final name, flushed to disk (fsync) with its folder;
2. commit: that folder is renamed to `<dir>/.fastpeft-commit-XXXX/` (one atomic rename, then the parent is
   fsynced). Before this rename nothing visible changed; after it the new version is the folder's version;
3. publish: the committed files are renamed over the old ones, the parent is fsynced, the empty commit folder
   removed.

A kill before step 2 leaves the old files plus a stale staging folder (removed by the next save). A kill
during step 3 leaves a commit folder whose files are the newer half: fastpeft's readers (`pending_file`) take
a file from it in preference to the visible one, so loads see the complete new adapter, and the next save to
the folder finishes publishing first. Only files that the save writes are touched: other files in the folder
(user files, other adapters' subfolders) are never moved or deleted. A save holds an exclusive `flock` on the
folder (where the OS has one), so two processes saving into one folder take turns and a leftover staging
/ commit folder always belongs to a dead save. One folder is one unit: `save_pretrained` with several adapters
commits each adapter's folder on its own.

Folders written whole by other code (a merged model's `save_pretrained`, a CLI checkpoint) use
`replace_folder`: built in a hidden sibling, fsynced, then swapped in for the old folder in one rename.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; saves into one folder from two processes are then not serialised
    fcntl = None

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".fastpeft-staging-"
COMMIT_PREFIX = ".fastpeft-commit-"

Writer = Callable[[str], None]


def write_files(jobs: list[tuple[str | os.PathLike, Writer]]) -> None:
    """Write `(path, writer)` jobs; the files of each folder are committed together (see the module
    docstring)."""
    by_folder: dict[Path, list[tuple[str, Writer]]] = {}
    for path, write in jobs:
        path = Path(path)
        by_folder.setdefault(path.parent, []).append((path.name, write))
    for folder, files in by_folder.items():
        commit_folder(folder, files)


def commit_folder(folder: Path, files: list[tuple[str, Writer]]) -> None:
    """Stage, commit and publish `files` (name, writer) into `folder`."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(folder.parent)  # the new folder's own entry
    with _folder_lock(folder):
        recover(folder)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        try:
            _stage(staging, files)
            committed = folder / (COMMIT_PREFIX + staging.name[len(STAGING_PREFIX):])
            os.replace(staging, committed)  # the commit point
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(folder)
        _publish(committed, folder)


def _stage(staging: Path, files: list[tuple[str, Writer]]) -> None:
    mode = _default_file_mode()
    for name, write in files:
        path = staging / name
        write(str(path))
        os.chmod(path, mode)  # mkdtemp's folder is private; the file gets the mode a plain open() would give
        fsync_file(path)
    fsync_dir(staging)


def _publish(committed: Path, folder: Path) -> None:
    """Move a committed folder's files over the visible ones, then drop it (safe to repeat after a kill)."""
    for entry in sorted(os.listdir(committed)):
        os.replace(committed / entry, folder / entry)
    fsync_dir(folder)
    # not fsynced: an empty commit folder that reappears after a power cut is just removed
    os.rmdir(committed)


def recover(folder: Path) -> None:
    """Finish saves killed after their commit point; delete staging folders of saves killed before it."""
    for entry in sorted(os.listdir(folder)):
        path = folder / entry
        if entry.startswith(COMMIT_PREFIX) and path.is_dir() and not path.is_symlink():
            _publish(path, folder)
        elif entry.startswith(STAGING_PREFIX) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def pending_file(folder: str | os.PathLike, name: str) -> Path | None:
    """`name` as left in a commit folder by a save killed while publishing (the newest version), else None."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return None
    for entry in entries:
        if entry.startswith(COMMIT_PREFIX):
            candidate = Path(folder) / entry / name
            if candidate.is_file() and not candidate.is_symlink():
                return candidate
    return None


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # some network / FUSE filesystems have no locks: save unserialised, say so
            logger.warning("Could not lock %s for saving (%s); saving without the lock: do not save into "
                           "this folder from two processes at once.", folder, err)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock (a killed process releases it too)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside `path` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- whole folders
NEW_FOLDER_TAG = ".fastpeft-new-"
OLD_FOLDER_TAG = ".fastpeft-old-"


def replace_folder(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a whole folder with `fill(tmp)` (e.g. a merged model's `save_pretrained`) and swap it in for
    `target`.

    `fill` writes into a hidden sibling `.<name>.fastpeft-new-XXXX`; everything in it is fsynced, then it
    takes `target`'s place in one step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, so a kill
    between them leaves no `target` but both complete versions beside it). A failure or kill inside `fill`
    leaves `target` as it was; leftovers of killed runs are removed by the next call for the same `target`.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _drop_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{NEW_FOLDER_TAG}", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private; the result gets a plain mkdir's mode
        fill(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, target)
    return target


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        fsync_dir(target.parent)
        return
    if not _exchange(new, target):  # no atomic exchange here: move the old one aside first
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_FOLDER_TAG}", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(new, target)
        new = old
    fsync_dir(target.parent)
    if new.is_symlink():  # `target` was a link to a folder: drop the link, never the folder it points to
        new.unlink()
    else:
        shutil.rmtree(new, ignore_errors=True)  # now the old version


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):  # no C library to open (Windows) or no renameat2 (macOS)
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _drop_leftovers(target: Path) -> None:
    """Remove the hidden folders of earlier `replace_folder(target)` calls that were killed; an old version
    moved aside by a swap killed half-way (no `target` left) is put back first."""
    prefixes = (f".{target.name}{NEW_FOLDER_TAG}", f".{target.name}{OLD_FOLDER_TAG}")
    for entry in sorted(os.listdir(target.parent)):
        path = target.parent / entry
        if not entry.startswith(prefixes) or not path.is_dir() or path.is_symlink():
            continue
        moved_aside = path / target.name
        if entry.startswith(prefixes[1]) and moved_aside.is_dir() and not target.exists():
            os.replace(moved_aside, target)
        shutil.rmtree(path, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (files first, so each folder is synced after its entries)."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(folder)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_file_mode() -> int:
    return 0o666 & ~_umask()
