"""Claims: several `wsiproc run` processes share one output folder, and each slide is computed once.

Before computing a slide a process creates `.<stem>.claim` next to the outputs with O_CREAT|O_EXCL, so of
two processes that try at the same moment exactly one succeeds (the file system decides, not the
processes). The file names who holds it (host, pid, start time, wsiproc version). A claim whose holder is
gone is *stale* and is taken over:

- same host: the process no longer exists (or the pid now belongs to another process, or the machine
  rebooted), which `psutil` can tell for certain;
- another host: its processes cannot be seen from here, so only age tells: older than the claim timeout.

Why this works on a shared NFS folder: NFSv3 and v4 implement an exclusive create on the server (the
Linux client sends CREATE with the EXCLUSIVE mode / OPEN with EXCLUSIVE4), so O_EXCL is atomic across
machines, as it is on a local disk; renames are atomic on the server too, which is what a takeover
relies on. (On NFSv2, which has no exclusive create, the classic substitute is a link-based lock:
write a unique file, `link()` it to the claim name, and check the link count.)
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from .._version import __version__

#: A claim on another host counts as abandoned after this long (the longest slide must take less).
DEFAULT_TIMEOUT_S = 24 * 3600.0
#: A claim file that cannot be read yet (its holder was killed between creating and filling it) is stale
#: after this long; a live holder fills it within microseconds.
UNREADABLE_GRACE_S = 60.0

HOST = socket.gethostname()


def _start_time(pid: int) -> float | None:
    """When process `pid` started (None: no such process, or a zombie): tells a reused pid from the holder."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: it will never release its claim
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # exists, but its details are hidden: count it as alive


@dataclass(frozen=True)
class Claim:
    """Who is computing a slide, as written in its claim file (JSON)."""

    host: str
    pid: int
    started: float  # Unix time the claim was made
    version: str = __version__
    token: str = ""  # random: tells this claim from a later one by the same host and pid
    pid_started: float = 0.0  # the holder's process start time, against pid reuse
    boot_time: float = 0.0  # the holder's machine boot time, against reboots
    input: str = ""
    path: Path = field(default=Path(), compare=False)

    @classmethod
    def new(cls, path: Path, input_name: str = "") -> "Claim":
        """A claim for this process."""
        pid = os.getpid()
        return cls(HOST, pid, time.time(), token=secrets.token_hex(8), pid_started=_start_time(pid) or 0.0,
                   boot_time=psutil.boot_time(), input=input_name, path=path)

    @classmethod
    def read(cls, path: Path) -> "Claim | None":
        """The claim at `path`; None when there is none. A file not yet filled reads as an anonymous claim."""
        try:
            text = path.read_text(encoding="utf-8")
            mtime = path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), float(data["started"]), str(data.get("version", "")),
                       str(data.get("token", "")), float(data.get("pid_started", 0.0)), float(data.get("boot_time", 0.0)),
                       str(data.get("input", "")), path)
        except (ValueError, KeyError, TypeError):
            return cls("", 0, mtime, "", "", path=path)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        data["started_iso"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started))
        return json.dumps(data, indent=1) + "\n"

    @property
    def owner(self) -> str:
        """HOST:PID, as reports name the holder."""
        return f"{self.host}:{self.pid}" if self.host else "an unknown process"

    def stale_reason(self, timeout_s: float = DEFAULT_TIMEOUT_S, now: float | None = None) -> str | None:
        """Why this claim is abandoned, or None while its holder may still be working."""
        age = (time.time() if now is None else now) - self.started
        if not self.host:
            return f"unreadable for {age:.0f} s" if age > UNREADABLE_GRACE_S else None
        if self.host != HOST:
            return f"older than {timeout_s:g} s (held on another host)" if age > timeout_s else None
        if self.boot_time and abs(self.boot_time - psutil.boot_time()) > 1.0:
            return "this machine has rebooted since"
        started = _start_time(self.pid) if self.pid > 0 else None
        if started is None:
            return "its process is gone"
        if self.pid_started and started > 0 and abs(started - self.pid_started) > 0.5:
            return "its process is gone (the pid now belongs to another one)"
        return None


@dataclass(frozen=True)
class Attempt:
    """The outcome of trying to claim: ours, or held by someone else; and any stale claim replaced on the way."""

    claim: Claim | None
    holder: Claim | None = None
    replaced: Claim | None = None
    replaced_because: str = ""


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text` only if it does not exist (O_CREAT|O_EXCL); False when it does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # a full disk: no empty claim may stay behind to block the slide
        raise
    os.close(fd)
    return True


def _remove_stale(stale: Claim) -> bool:
    """Remove `stale` if it is still the claim at its path; True when this process removed it.

    Two processes may find the same claim stale. Renaming it to a unique name first lets only one of them
    have it; the winner checks that what it moved is the stale claim and not a fresh one that a faster
    process created meanwhile (which it puts back).
    """
    path = stale.path
    aside = path.with_name(f"{path.name}.{secrets.token_hex(6)}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = Claim.read(aside)
    if moved is not None and (moved.token, moved.host, moved.pid) == (stale.token, stale.host, stale.pid):
        aside.unlink(missing_ok=True)
        return True
    try:
        os.link(aside, path)  # fails if yet another claim exists by now: that one stands
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        os.rename(aside, path)
        return False
    aside.unlink(missing_ok=True)
    return False


def acquire(path: Path, input_name: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> Attempt:
    """Claim `path` for this process, taking over a stale claim; a live one of another process is left alone."""
    mine = Claim.new(path, input_name)
    replaced, because = None, ""
    for _ in range(5):
        if _create_exclusive(path, mine.to_json()):
            return Attempt(mine, replaced=replaced, replaced_because=because)
        current = Claim.read(path)
        if current is None:  # released between our create and our read: try again
            continue
        reason = current.stale_reason(timeout_s)
        if reason is None:
            return Attempt(None, holder=current, replaced=replaced, replaced_because=because)
        if _remove_stale(current):
            replaced, because = current, reason
    return Attempt(None, holder=Claim.read(path) or Claim("", 0, time.time(), path=path))


def release(claim: Claim) -> None:
    """Remove our claim; one that is no longer ours (taken over after a timeout) is left to its new holder."""
    current = Claim.read(claim.path)
    if current is not None and current.token == claim.token and current.pid == claim.pid:
        claim.path.unlink(missing_ok=True)


def wait_for(path: Path, timeout_s: float, wait_s: float, poll_s: float = 0.05) -> Attempt:
    """`acquire`, retried while another process holds the claim, for at most `wait_s` seconds (short locks)."""
    deadline = time.monotonic() + wait_s
    while True:
        attempt = acquire(path, timeout_s=timeout_s)
        if attempt.claim is not None or time.monotonic() > deadline:
            return attempt
        time.sleep(poll_s)
