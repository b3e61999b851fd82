"""Outputs written beside their destination and renamed into place: nothing half-written is ever left
at a user's path. Standard library only (the image checks live in :mod:`FastSAM3DLib.io`)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from .errors import ImageError


class OutputError(OSError):
    """An output file could not be written completely; nothing was put in its place."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class StagedFile:
    """One output written under a temporary folder beside its destination, then renamed into place.

    The file is written with its final name inside the temporary folder, so formats that write a
    separate data file (``.mhd`` + ``.raw``, ``.nhdr`` + ``.raw.gz``) reference the right name; every
    file it produced is moved next to ``path`` by :func:`commit_staged`. Until then nothing at the
    destination is touched; :meth:`discard` removes the temporary folder.
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self.tmp = self.folder / self.path.name

    def write(
        self,
        write: Callable[[str], None],
        check: Optional[Callable[[Path], None]] = None,
        explain: Callable[[BaseException], str] = str,
    ) -> None:
        """Call ``write(temporary path)``, then ``check(temporary path)`` (e.g. every voxel is there:
        it raises ImageError if not), and fsync the result.

        Raises:
          OutputError: the writer failed, or wrote an incomplete file (e.g. the disk is full);
            ``explain`` turns the writer's exception into the reason given.
        """
        try:
            write(str(self.tmp))
            if not self.tmp.exists():
                raise FileNotFoundError(errno.ENOENT, "the writer produced no file")
            if check is not None:
                check(self.tmp)
            mode = 0o666 & ~_umask()  # mkdtemp's folder is private; the outputs get the usual permissions
            for produced in self.folder.iterdir():
                os.chmod(produced, mode)
                with open(produced, "rb") as stream:
                    os.fsync(stream.fileno())
        except (OSError, RuntimeError, ImageError) as error:
            reason = explain(error)
            if isinstance(error, ImageError):
                reason = f"the written file is incomplete, is the disk full? ({reason})"
            raise OutputError(
                getattr(error, "errno", None) or errno.EIO,
                f"{self.path}: could not be written: {reason}; nothing was written there and any existing file is unchanged",
            ) from None

    def moves(self) -> List[Tuple[Path, Path]]:
        """(temporary, final) paths, data files before the file that names them."""
        produced = sorted(self.folder.iterdir(), key=lambda p: p.name == self.path.name)
        return [(p, self.path.parent / p.name) for p in produced]

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def commit_staged(staged: Sequence[StagedFile]) -> None:
    """Move every staged file into place; if any move fails, put back what was there before.

    Existing destinations are kept as hard links until all moves succeeded (where the file system
    has no hard links, a failed later move cannot restore an earlier one).
    """
    done: List[Tuple[Path, Optional[Path], bool]] = []  # (destination, backup, existed before)
    try:
        for stage in staged:
            for source, destination in stage.moves():
                backup = None
                existed = destination.exists()
                if existed:
                    backup = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.bak")
                    try:
                        os.link(destination, backup)
                    except OSError:
                        backup = None
                done.append((destination, backup, existed))
                os.replace(source, destination)
        try:  # make the renames durable
            folder = os.open(staged[0].path.parent, os.O_RDONLY) if staged else None
            if folder is not None:
                os.fsync(folder)
                os.close(folder)
        except OSError:
            pass
    except BaseException:
        for destination, backup, existed in reversed(done):
            if backup is not None:
                os.replace(backup, destination)
            elif not existed:
                destination.unlink(missing_ok=True)
        raise
    finally:
        for _, backup, _ in done:
            if backup is not None:
                backup.unlink(missing_ok=True)
        for stage in staged:
            stage.discard()
