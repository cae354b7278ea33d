"""One writer per ``--save`` directory.

Two runs writing the same checkpoints (a job resubmitted while the first still runs, a typo in a second
launcher) would interleave their iterations and corrupt the tracker. Rank 0 creates
``SAVE/.megatron_solo.lock`` atomically (``O_EXCL``) with host, pid, start time and a heartbeat a thread
refreshes; a live lock stops a second run at start-up, a stale one (heartbeat older than ``STALE_S``, or a
dead pid on this host) is taken over with a warning. It relies on the heartbeat, not on ``flock``
(unreliable on Lustre/NFS).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from megatron_solo.errors import InputError, global_rank, print_error

LOCK_NAME = ".megatron_solo.lock"
HEARTBEAT_S = 10.0   # how often the lock holder refreshes its heartbeat
STALE_S = 60.0       # a heartbeat older than this means the holder is gone (clocks agree within seconds)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped) is not a holder
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class SaveDirLock:
    """``SAVE/.megatron_solo.lock``: a JSON record {host, pid, start_time, heartbeat, owner}.

    Creation is atomic (``O_CREAT | O_EXCL``, atomic on local filesystems, NFSv3+ and Lustre); the owner
    rewrites the record (temporary file + rename) every ``heartbeat_s``. A record is stale when its holder
    is a dead pid on this host, or its heartbeat is older than ``stale_s``. A takeover is serialised by a
    second ``O_EXCL`` file (``.takeover``), so two runs that find the same stale lock cannot both win.
    """

    def __init__(self, save_dir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.save_dir = save_dir
        self.path = os.path.join(save_dir, LOCK_NAME)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.owner = uuid.uuid4().hex
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(),
                       "heartbeat": time.time(), "owner": self.owner}
        self._stop = threading.Event()
        self._thread = None
        self.held = False
        self.warning = None  # said out loud by the caller when a stale lock was taken over

    # -- reading
    def read(self) -> dict | None:
        """The current record, None when there is no lock; an unreadable one counts as its file's mtime."""
        try:
            with open(self.path) as f:
                text = f.read()
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise ValueError
        except ValueError:  # being written right now, or damaged: age it by the file's mtime
            rec = {"host": "?", "pid": -1, "start_time": st.st_mtime, "heartbeat": st.st_mtime, "owner": "?"}
        return rec

    def is_stale(self, rec: dict) -> str | None:
        """Why ``rec``'s holder is gone, or None when it is live."""
        age = time.time() - float(rec.get("heartbeat", 0))
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int) and rec["pid"] > 0 \
                and not _pid_alive(rec["pid"]):
            return f"its process {rec['pid']} on this host is gone"
        if age >= self.stale_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_s:.0f} s)"
        return None

    @staticmethod
    def describe(rec: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec.get("start_time", 0))))
        return f"pid {rec.get('pid')} on {rec.get('host')}, started {started}"

    # -- taking and keeping it
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, stale: dict) -> None:
        guard = self.path + ".takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):  # a taker that died in between
                if time.time() - os.stat(guard).st_mtime > self.stale_s:
                    os.remove(guard)
            return
        os.close(fd)
        try:
            now = self.read()
            if now is not None and now.get("owner") == stale.get("owner") and self.is_stale(now):
                os.remove(self.path)
        finally:
            os.remove(guard)

    def holder_alive(self, rec: dict) -> bool:
        """Whether ``rec``'s holder is alive: on this host its pid says so at once; a holder on another
        host must refresh its heartbeat while we watch (at most until the heartbeat would be stale), so a
        job requeued on another node after its predecessor died waits instead of failing."""
        if self.is_stale(rec) is not None:
            return False
        if rec.get("host") == socket.gethostname():
            return True
        deadline = float(rec.get("heartbeat", 0)) + self.stale_s
        if global_rank() == 0:
            print(f"megatron_solo: --save {self.save_dir} is locked by {self.describe(rec)}; watching its "
                  f"heartbeat for up to {max(deadline - time.time(), 0):.0f} s", file=sys.stderr, flush=True)
        while time.time() < deadline:
            time.sleep(min(1.0, self.heartbeat_s / 4))
            now = self.read()
            if now is None or now.get("owner") != rec.get("owner") or now.get("heartbeat") != rec.get("heartbeat"):
                return True  # refreshed (or replaced by a live run): someone is there
        return False

    def check_free(self) -> dict | None:
        """Raise :class:`InputError` naming a live holder; returns a stale record (or None: no lock)."""
        rec = self.read()
        if rec is not None and self.holder_alive(rec):
            raise InputError(
                f"--save {self.save_dir} is in use by another run ({self.describe(rec)}, heartbeat "
                f"{max(time.time() - float(rec.get('heartbeat', 0)), 0):.0f} s ago); stop that run or choose "
                f"another --save (a holder that died is taken over once its heartbeat is {self.stale_s:.0f} s old)")
        return rec

    def acquire(self) -> None:
        """Take the lock or raise :class:`InputError` naming the live holder."""
        os.makedirs(self.save_dir, exist_ok=True)
        for _ in range(5):
            if self._create():
                break
            rec = self.check_free()
            if rec is None:
                continue
            why = self.is_stale(rec) or f"its heartbeat stopped {time.time() - float(rec.get('heartbeat', 0)):.0f} s ago"
            self.warning = (f"warning: taking over the lock of {self.save_dir} from a run that is gone "
                            f"({self.describe(rec)}: {why})")
            self._take_over(rec)
            time.sleep(0.05)
        else:
            raise InputError(f"could not take the lock {self.path} (other runs keep taking it); retry")
        if (self.read() or {}).get("owner") != self.owner:  # paranoia for filesystems with weak O_EXCL
            raise InputError(f"--save {self.save_dir}: another run took the lock at the same moment")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="megatron_solo-save-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            rec = self.read()
            if rec is None and self._create():  # removed by hand: nobody else holds it, take it back
                rec = self.read()
            if rec is None or rec.get("owner") != self.owner:
                # Taken over (we were paused past STALE_S, or someone removed it): this run may not write.
                print_error(f"the lock of --save {self.save_dir} was taken by another run "
                            f"({self.describe(rec) if rec else 'removed'}); stopping without saving",
                            all_ranks=True)
                os._exit(1)
            self.record["heartbeat"] = time.time()
            tmp = f"{self.path}.{self.owner}.tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(self.record, f)
                os.replace(tmp, self.path)
            except OSError:  # a full disk must not kill the run here; the save reports it
                with contextlib.suppress(OSError):
                    os.remove(tmp)

    def release(self, join: bool = True) -> None:
        self._stop.set()
        if self._thread is not None and join:
            self._thread.join(timeout=5)
        if self.held:
            with contextlib.suppress(OSError):
                if (self.read() or {}).get("owner") == self.owner:
                    os.remove(self.path)
            self.held = False
