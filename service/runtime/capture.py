"""Capture everything this process writes to stdout and stderr, line by line, into a file.

A bare ``python -m zerotrain.service.runtime`` run talks to a person; Ray writes its
own chatter to the same terminal: Python logging, the output its actors
forward to the driver, and C++ log lines written straight to file
descriptor 2. :class:`OutputCapture` points file descriptors 1 and 2 at a
pipe for its duration; a thread reads the pipe, appends each line (without
colour codes) to the log file and hands it to a callback. What the person
should see goes to :func:`terminal`, a copy of the original stdout taken
before the capture starts.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from zerotrain.service.display import strip_ansi

__all__ = ["OutputCapture", "terminal"]


def terminal() -> TextIO:
    """A new text stream on (a duplicate of) the current stdout, line-buffered.

    Take it before an :class:`OutputCapture` starts: it keeps writing to the
    terminal (or file, or pipe) that stdout was while fd 1 is captured.
    """
    sys.stdout.flush()
    return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")


class OutputCapture:
    """``with OutputCapture(log_path, on_line):`` fds 1 and 2 go to ``log_path``.

    Each complete line (colour codes stripped) is appended to ``log_path`` and
    passed to ``on_line`` on the reader thread; ``on_line`` must not raise or
    block for long. Child processes started meanwhile inherit the pipe, so
    their output is captured too. On exit the original fds are restored and
    what is still in the pipe is read; a child that still holds the pipe does
    not keep the exit waiting.
    """

    def __init__(self, log_path: str | os.PathLike, on_line: Callable[[str], None]) -> None:
        self.log_path = Path(log_path)
        self.on_line = on_line
        self._saved: tuple[int, int] | None = None
        self._read_fd = -1
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputCapture:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a", encoding="utf-8")
        log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        log.flush()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        read_fd, write_fd = os.pipe()
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        self._line_buffering = sys.stdout.line_buffering
        # Ray's forwarded lines are read as they come only if stdout flushes each line.
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._read, args=(log,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None and self._thread is not None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout.reconfigure(line_buffering=self._line_buffering)  # type: ignore[union-attr]
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        self._done.set()
        self._thread.join(timeout=10)

    def _read(self, log: TextIO) -> None:
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([self._read_fd], [], [], 0.2)
                if not ready:
                    if self._done.is_set():
                        break  # restored, and nothing more came: a child may still hold the pipe
                    continue
                chunk = os.read(self._read_fd, 1 << 16)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    self._emit(log, raw)
            if pending:
                self._emit(log, pending)
        finally:
            log.close()
            os.close(self._read_fd)

    def _emit(self, log: TextIO, raw: bytes) -> None:
        line = strip_ansi(raw.decode("utf-8", errors="replace")).rstrip("\r")
        log.write(line + "\n")
        log.flush()
        try:
            self.on_line(line)
        except Exception as exc:  # a display problem must not lose the rest of the log
            log.write(f"(zerotrain: could not show this line: {exc})\n")
