"""One run per output directory: an exclusive lock held for the whole run.

    with hold_directory(out, state, wait=False):   # state: accelerate's PartialState / Accelerator
        ...                                        # only this run writes `out`

The lock is `fcntl.flock` on `DIR/.lock`, a file kept open for the run. The kernel releases it
when the holder's process ends, however it ends (SIGKILL, OOM killer), so taking over the lock
of a dead run is the same race-free system call as taking a free one: there is no stale-lock
heuristic, no pid check. Inside, the holder writes its pid, host, start time and command, for
the message that refuses a second run.

The file stays after a run, with one exception: a run that fails having created `DIR` and
written nothing else in it (a mistyped dataset, a bad layer index) removes `.lock` and `DIR`
while it still holds the lock, so a refused command leaves no empty folder behind. A run that
was waiting on that lock sees, once it has it, that its file is no longer `DIR/.lock` and starts
over on a new one: two runs never hold two different files of one directory.

Processes that `fork` (DataLoader workers) close their copy of the descriptor, so an orphaned
worker of a killed run never keeps its lock. Under `accelerate launch` / `torchrun` the main
process takes the lock for the whole launch; the others learn the outcome from it, so a refused
launch fails on every process at once, none waiting on the others.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"
_HELD: set[int] = set()  # descriptors this process holds a lock through


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class DirectoryInUseError(OSError):
    """Another run holds the directory's lock (the message names it)."""


class DirectoryLock:
    """The exclusive lock of one directory (see the module docstring).

    Args:
        directory: The output directory (created when missing).
        what: What the run is, for messages (`extraction`, `training run`).
        hint: What to do instead, appended to the refusal.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "run", hint: str = "") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self.hint = hint
        self._fd: int | None = None
        self._created: list[Path] = []  # the folders `acquire` made, deepest first

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False, timeout: float | None = None, poll_s: float = 0.2) -> DirectoryLock:
        """Take the lock, or raise `DirectoryInUseError` naming the holder.

        Args:
            wait: Wait for the holder to finish instead of raising (a message says so, once).
            timeout: With `wait`, give up after this many seconds (default: wait forever).
            poll_s: With `wait`, seconds between attempts.
        """
        if self._fd is not None:
            return self
        deadline = None if timeout is None else time.monotonic() + timeout
        announced = False
        while True:  # again when the file we locked was removed by a failed run that held it
            fd = self._open()
            try:
                announced = self._flock(fd, wait, deadline, poll_s, announced)
            except BaseException:
                os.close(fd)
                raise
            if self._is_the_lock_file(fd):
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                  "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return self

    def _flock(self, fd: int, wait: bool, deadline: float | None, poll_s: float, announced: bool) -> bool:
        """Lock `fd`, waiting for the holder with `wait` (saying so once: returns whether it has),
        or raise `DirectoryInUseError` naming the holder."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return announced
            except BlockingIOError:
                message = self._refusal(fd)
                if not wait or (deadline is not None and time.monotonic() >= deadline):
                    raise DirectoryInUseError(f"{message}; {self.hint}" if self.hint else message) from None
                if not announced:
                    print(f"{message}; waiting for it to finish", file=sys.stderr, flush=True)
                    announced = True
                time.sleep(poll_s)

    def _open(self) -> int:
        """Open (create) `DIR/.lock`, creating `DIR` when missing (remembering the folders made)."""
        while True:
            missing = []
            for folder in (self.directory, *self.directory.parents):
                if folder.exists():
                    break
                missing.append(folder)
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                if self.directory.is_dir():  # not a folder removed in between (a dangling link?)
                    raise
                continue  # a failed holder removed the folder in between: again
            self._created = missing
            return fd

    def _is_the_lock_file(self, fd: int) -> bool:
        """Whether `fd` is still the file at `DIR/.lock` (a failed holder may have removed it)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self, remove_if_unused: bool = False) -> None:
        """Release the lock (the file stays; its holder record is cleared).

        Args:
            remove_if_unused: When this lock created the directory and it holds nothing but the
                lock file, remove both (and the parents it created, when empty) before releasing.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(fd)
        if remove_if_unused and self._created:
            self._remove_created()
        try:
            os.ftruncate(fd, 0)
            # Unlock the open file description itself: a child forked a moment ago may not have
            # closed its copy of the descriptor yet, and a close alone would leave it locked.
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _remove_created(self) -> None:
        """Remove `.lock` and the folders this lock created, while the lock is still held; a run
        that was waiting on the old file starts over on a new one (`_is_the_lock_file`)."""
        try:
            if [p.name for p in self.directory.iterdir()] != [LOCK_NAME]:
                return
            self.path.unlink()
            for folder in self._created:
                folder.rmdir()  # deepest first; stops at a folder something else wrote into
        except OSError:
            return

    def _refusal(self, fd: int) -> str:
        holder: dict[str, Any] = {}
        for _ in range(20):  # the holder writes its record just after taking the lock: give it a second
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder:
                break
            time.sleep(0.05)
        who = (f"{holder.get('what', 'a run')} pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
               f"since {holder.get('started', '?')} ({holder.get('command', '')})") if holder else "another process"
        return f"{self.directory} is in use by {who}: one run per directory"

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            self.release()


class hold_directory:  # noqa: N801 (used as a function / context manager)
    """Lock `directory` for a (possibly multi-process) run: the main process takes the lock, and
    every process raises `DirectoryInUseError` when it is refused.

    Args:
        directory: The output directory.
        state: `accelerate.PartialState` or `Accelerator` of the run (`None`: one process).
        what: What the run is, for messages.
        hint: What to do instead, appended to the refusal.
        wait: Wait for the holder to finish instead of raising.
    """

    def __init__(self, directory: str | os.PathLike, state: Any = None, what: str = "run", hint: str = "",
                 wait: bool = False) -> None:
        self.lock = DirectoryLock(directory, what, hint)
        self.state = state
        self.wait = wait

    def __enter__(self) -> DirectoryLock:
        main = self.state is None or self.state.is_main_process
        error = ""
        if main:
            try:
                self.lock.acquire(wait=self.wait)
            except DirectoryInUseError as err:
                error = str(err)
        if self.state is not None and self.state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error], from_process=0)[0]
        if error:
            raise DirectoryInUseError(error if main else f"{error} (refused by the main process)")
        return self.lock

    def __exit__(self, error_type: Any, *exc: Any) -> None:
        # A failed run that created the folder and wrote nothing in it leaves nothing behind.
        self.lock.release(remove_if_unused=error_type is not None)
