"""The run directory's life: one process at a time, earlier results kept until a new run can start,
and a plain answer to "is this run finished?".

* :class:`RunLock` holds an exclusive ``flock`` on ``<run>/.kdistill.lock`` for as long as a
  process works in the run directory; a second process gets one line naming the holder. The
  kernel drops the lock when the process dies (even by SIGKILL), so a crash never leaves a stale lock.
* :func:`check_run_dir` refuses to touch earlier results unless resuming or forced; with
  ``--force``, :func:`move_results_aside` moves them aside (:class:`Replaced`) rather than deleting
  them, so that a run that fails before it starts gives them back.
* :func:`unfinished` says which phase of a run has not finished, for ``eval``, ``report`` and ``export``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from kdistill.core.errors import ConfigError, KDistillError

RESULT_FILES = ("report.json", "report.md", "plots", "config.yaml", "teacher", "baseline", "distill")
LOCK_NAME = ".kdistill.lock"
ASIDE_PREFIX = ".replaced-"


class RunBusyError(KDistillError):
    """Another process works in the run directory."""


class RunLock:
    """An exclusive lock on a run directory (created if missing), released by :meth:`release`,
    on leaving a ``with`` block, or when the process ends."""

    def __init__(self, run_dir: Path, purpose: str = "training") -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.created = not Path(run_dir).exists()  # removed again if nothing else was written into it
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a+")  # noqa: SIM115 — held open for the lock's lifetime
        except OSError as error:
            raise ConfigError(f"cannot write to output directory {run_dir}: {error.strerror or error}") from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise RunBusyError(
                f"{run_dir} is in use by another kdistill process ({holder}); wait for it to finish or use "
                "another --out"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}, {purpose}")
        self.handle.flush()

    def release(self) -> None:
        if self.handle.closed:
            return
        if self.created and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            try:  # a run that failed before writing anything leaves no directory behind
                self.path.unlink()
                self.path.parent.rmdir()
            except OSError:  # something appeared meanwhile: leave it
                pass
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Replaced:
    """Earlier results moved aside by ``--force``: :meth:`discard` once the new run has started,
    :meth:`restore` if it could not."""

    def __init__(self, run_dir: Path, names: list[str]) -> None:
        self.run_dir = run_dir
        self.aside = run_dir / f"{ASIDE_PREFIX}{os.getpid()}"
        # config.yaml first: while it is still in `out`, nothing has moved (check_run_dir relies on it).
        self.names = sorted(names, key=lambda name: name != "config.yaml")
        self.aside.mkdir()
        for name in self.names:
            os.replace(run_dir / name, self.aside / name)

    def restore(self) -> None:
        for name in self.names:
            target = self.run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(self.aside / name, target)
        self.aside.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.aside, ignore_errors=True)


def check_run_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse a run directory that holds results, unless resuming or forced (call with the lock held)."""
    for aside in out.glob(f"{ASIDE_PREFIX}*"):  # left by a --force run killed before or after it started
        if (out / "config.yaml").exists():
            shutil.rmtree(aside, ignore_errors=True)  # the new run had started: these were replaced
        else:
            for item in aside.iterdir():  # it had not: the earlier results come back
                if not (out / item.name).exists():
                    os.replace(item, out / item.name)
            shutil.rmtree(aside, ignore_errors=True)
    if resume:  # pipeline.saved_config reads (and requires) its config.yaml
        return
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not force:
        raise ConfigError(
            f"{out} already holds results ({', '.join(existing)}); pass --resume to continue that run, "
            "--force to replace it, or choose another --out"
        )
    try:
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write to output directory {out}: {error.strerror or error}") from None


def move_results_aside(out: Path) -> Replaced | None:
    """``--force``: the earlier results moved aside, once the new run has been checked."""
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    return Replaced(out, existing) if existing else None


def check_out_path(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")


def unfinished(run_dir: Path) -> str | None:
    """None when the run's distillation phase finished; else what is missing, in words."""
    if (run_dir / "distill" / "done.json").exists():
        return None
    for phase in ("teacher", "baseline", "distill"):
        checkpoint = run_dir / phase / "checkpoint.pt"
        if (run_dir / phase).is_dir() and not (run_dir / phase / "done.json").exists():
            where = ""
            metrics = run_dir / phase / "metrics.jsonl"
            if checkpoint.exists() and metrics.exists():
                epochs = [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "epoch"' in line]
                where = f" after {len(epochs)} epoch(s)" if epochs else " in its first epoch"
            return f"its {phase} phase stopped{where}"
    return "its distillation phase has not started"
