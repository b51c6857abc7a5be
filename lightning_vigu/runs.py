"""Run folders that lose nothing: one run per folder, atomic checkpoints, safe loading.

What ``fit`` guarantees (the CLI applies all of it, see :class:`~lightning_vigu.cli.ViGUCLI`):

* **One run per folder.** The folders a run writes (its checkpoint ``dirpath``s, its loggers'
  ``log_dir``s) are locked with ``fcntl.flock`` for the life of the process
  (:class:`RunLock`); a second run on them stops at once and names the first one's pid.
* **A fresh run never touches another run's files.** Without ``--ckpt_path`` a folder that
  already holds run files (checkpoints, ``metrics.csv``, ``config.yaml``, TensorBoard events)
  is refused (:func:`previous_run_files`), naming the folder and the ``--ckpt_path`` that resumes
  it.
* **A resume appends.** ``metrics.csv`` keeps its rows (:class:`AppendingCSVWriter`) and the
  resumed run's config is saved beside the original as ``config.resume-N.yaml``.
* **Checkpoints are written next to their target and renamed** (:class:`AtomicCheckpointIO`):
  a kill or a full disk leaves the previous file whole and no partial file behind.
* **Checkpoints load safely** (:func:`load_checkpoint_file`): ``weights_only=True`` unless the
  caller opts in to pickles; an unreadable file is refused with a message naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

LOCK_NAME = ".run.lock"
RUN_FILES = ("metrics.csv", "hparams.yaml", "config.yaml")
"""Files whose presence in a folder means a run wrote there (besides checkpoints and events)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot (or must not) be loaded; the message names the file and the fix."""


class RunFolderError(RuntimeError):
    """A run folder that is in use by another run or holds another run's files."""


# ---------------------------------------------------------------------------- checkpoints
def load_checkpoint_file(
    path: str | Path,
    *,
    trust_pickle: bool = False,
    flag: str = "--trust-pickle",
    what: str = "checkpoint",
    mmap: bool = False,
) -> Any:
    """``torch.load`` on the CPU, safely by default, with errors that name the file.

    Args:
        path: the file.
        trust_pickle: load arbitrary pickled objects (``weights_only=False``): this runs code
            stored in the file, so only for files whose origin you trust.
        flag: the option that sets ``trust_pickle`` (named in the refusal).
        what: what the file is, for messages (``"init_from checkpoint"``).
        mmap: memory-map tensor storages (cheap check of a large file).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: empty, cut-off or corrupt file; or pickled objects without
            ``trust_pickle``.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    if file.stat().st_size == 0:
        raise CheckpointError(
            f"{what} '{path}' is empty (0 bytes): its write was cut off. Delete it and use an "
            "earlier checkpoint"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as exn:
        if not trust_pickle and "Weights only load failed" in str(exn):
            detail = next((ln for ln in str(exn).splitlines() if "GLOBAL" in ln), "")
            raise CheckpointError(
                f"{what} '{path}' holds pickled Python objects that safe loading "
                f"(torch.load(weights_only=True)) refuses{f' ({detail.strip()})' if detail else ''}; "
                f"loading them runs code stored in the file. Only if you trust where the file "
                f"came from, pass {flag}"
            ) from exn
        raise _unreadable(what, path, exn) from exn
    except (RuntimeError, EOFError, OSError, ValueError) as exn:
        raise _unreadable(what, path, exn) from exn


def _unreadable(what: str, path: str | Path, exn: BaseException) -> CheckpointError:
    first = str(exn).splitlines()[0] if str(exn) else ""
    return CheckpointError(
        f"{what} '{path}' is unreadable ({type(exn).__name__}: {first}); it was probably cut off "
        "while being written or copied. Delete it and use an earlier checkpoint"
    )


def check_checkpoint(path: str | Path, what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless it is a readable checkpoint."""
    if Path(path).is_dir():  # a sharded (FSDP) checkpoint folder: its loader checks it
        return
    load_checkpoint_file(path, what=what, mmap=True, flag="--trust-pickle")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing ``.<name>.<pid>.tmp`` beside the target, ``fsync``
    and ``os.replace``: the target is the old file or the new one, never a partial one.

    (Lightning's own writer stages the file in the system temp folder and moves it; across
    filesystems the move is a copy onto the target, which a kill or a full disk cuts short.)
    Remote urls (``s3://``...) use Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}; "
                "it takes none"
            )
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))
        return None

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if "://" not in str(path) and Path(path).is_file():
            check_checkpoint(path, "checkpoint (--ckpt_path)")
        return super().load_checkpoint(path, map_location, weights_only)


def atomic_write(target: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``target``, then rename it to ``target``.

    The temporary file is removed on any failure (full disk, interruption), so the folder holds
    the previous ``target`` (untouched) and nothing else.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def use_atomic_checkpoints(trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was configured with its own."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# ---------------------------------------------------------------------------- run folders
def run_folders(trainer) -> list[Path]:
    """The folders ``trainer`` writes run files to: checkpoint ``dirpath``s and log dirs."""
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    folders = []
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint | OnExceptionCheckpoint) and cb.dirpath:
            folders.append(cb.dirpath)
    for logger in trainer.loggers:
        if logger.log_dir:
            folders.append(logger.log_dir)
    if trainer.log_dir:
        folders.append(trainer.log_dir)
    return _unique(Path(f).expanduser().absolute() for f in folders)


def _unique(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def outermost(folders: Iterable[Path]) -> list[Path]:
    """``folders`` without those inside another one of them."""
    folders = _unique(folders)
    return [f for f in folders if not any(o != f and o in f.parents for o in folders)]


def previous_run_files(folders: Iterable[Path]) -> list[Path]:
    """Run files (checkpoints, CSV/YAML records, TensorBoard events) directly in ``folders``."""
    found = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if (
                p.suffix == ".ckpt"
                or p.name in RUN_FILES
                or p.name.startswith(("events.out.tfevents", "config.resume-"))
            ):
                found.append(p)
    return found


def last_checkpoints(trainer) -> list[Path]:
    """Candidates of ``--ckpt_path=last``, newest first: every ``last*.ckpt`` of the checkpoint
    callbacks and the files of ``OnExceptionCheckpoint`` (what Lightning chooses from)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    found = []
    for cb in trainer.callbacks:
        if isinstance(cb, OnExceptionCheckpoint):
            found.append(Path(cb.ckpt_path))
        elif isinstance(cb, ModelCheckpoint) and cb.dirpath:
            found += Path(cb.dirpath).glob(f"{cb.CHECKPOINT_NAME_LAST}*{cb.FILE_EXTENSION}")
    found = [p for p in _unique(found) if p.exists()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_last(trainer) -> Path | None:
    """The newest ``last`` checkpoint, checked readable (``None`` when there is none).

    Raises:
        CheckpointError: the newest one is unreadable (named, with the readable alternatives).
    """
    candidates = last_checkpoints(trainer)
    if not candidates:
        return None
    try:
        check_checkpoint(candidates[0], "newest checkpoint (--ckpt_path=last)")
    except CheckpointError as exn:
        others = []
        for p in candidates[1:]:
            try:
                check_checkpoint(p)
                others.append(str(p))
            except CheckpointError:
                continue
        hint = f"; readable ones: {others} (pass one as --ckpt_path)" if others else ""
        raise CheckpointError(f"{exn}{hint}") from exn
    return candidates[0]


def refuse_fresh_run_over(folders: Iterable[Path]) -> None:
    """Raise :class:`RunFolderError` when ``folders`` hold another run's files."""
    files = previous_run_files(folders)
    if not files:
        return
    ckpts = [p for p in files if p.suffix == ".ckpt"]
    last = next((p for p in ckpts if p.name.startswith("last")), ckpts[0] if ckpts else None)
    resume = f"--ckpt_path={last}" if last else "--ckpt_path=<its checkpoint>"
    shown = ", ".join(str(p) for p in files[:6]) + (" ..." if len(files) > 6 else "")
    raise RunFolderError(
        f"'{files[0].parent}' holds another run ({shown}); a fresh fit would overwrite its logs "
        f"and mix its checkpoints with this one's. To continue that run pass {resume} (or "
        "--ckpt_path=last). To start a new run, point trainer.default_root_dir, the loggers' "
        "save_dir and the checkpoint callbacks' dirpath at an empty folder, or move the old "
        "folder away"
    )


class RunLock:
    """Exclusive ``flock`` on ``<folder>/.run.lock`` for each folder, held until :meth:`release`
    (or the process ends: the kernel drops it even after ``kill -9``, so no lock goes stale).

    Raises:
        RunFolderError: another process holds one of the folders (its pid, host, start time
            and command are named).
    """

    def __init__(self, folders: Iterable[Path]) -> None:
        self._files: list[IO] = []
        try:
            for folder in outermost(folders):
                self._acquire(folder)
        except BaseException:
            self.release()
            raise

    def _acquire(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        f = open(path, "a+")  # noqa: SIM115 (held open: the lock lives as long as the file)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                other = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                other = {}
            f.close()
            who = (
                f"pid {other.get('pid', '?')} on {other.get('host', '?')}, started "
                f"{other.get('started', '?')}: {other.get('command', '?')}"
            )
            raise RunFolderError(
                f"run folder '{folder}' is in use by another run ({who}); wait for it to end or "
                f"stop it, or give this run another folder (lock file: {path})"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv),
                }
            )
        )
        f.flush()
        self._files.append(f)

    def release(self) -> None:
        """Drop every lock this object holds."""
        for f in self._files:
            f.close()  # closing the file releases its flock
        self._files = []


# ---------------------------------------------------------------------------- logs
class AppendingCSVWriter(ExperimentWriter):
    """``CSVLogger``'s writer that keeps the rows already in ``metrics.csv`` (Lightning's
    deletes the file when the folder is not empty), so a resumed run appends to its log."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = f.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)

    def _check_log_dir_exists(self) -> None:
        """Keep earlier rows (Lightning deletes ``metrics.csv`` here)."""


def append_csv_logs(trainer) -> None:
    """Make every ``CSVLogger`` of ``trainer`` append to its ``metrics.csv`` (rank 0 writes)."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and getattr(logger, "_experiment", "absent") is None:
            logger._experiment = AppendingCSVWriter(logger.log_dir)


def resume_config_name(log_dir: str | Path) -> str:
    """``config.resume-N.yaml`` with the first N not yet used in ``log_dir``."""
    n = 1
    while (Path(log_dir) / f"config.resume-{n}.yaml").exists():
        n += 1
    return f"config.resume-{n}.yaml"
