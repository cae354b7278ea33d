"""What a training run does when something goes wrong, in one place (docs/TRAINING.md, "What happens when ...").

- :func:`watch_parent`: a worker started by torchrun exits (without saving) within a second of its agent
  dying by any signal: ``prctl(PR_SET_PDEATHSIG)`` on Linux plus a parent-pid watch thread everywhere.
- :class:`SaveDirLock`: one writer per ``--save`` directory. Rank 0 creates ``SAVE/.megatron_solo.lock``
  atomically (``O_EXCL``) with host, pid, start time and a heartbeat a thread refreshes; a live lock stops
  a second run at start-up, a stale one (heartbeat older than ``STALE_S``, or a dead pid on this host) is
  taken over with a warning. It relies on the heartbeat, not on ``flock`` (unreliable on Lustre/NFS).
- :func:`check_inputs`: every input checked before anything is built (no megatron-core initialisation,
  one process; launchers' pre-flight calls it too). Each failure is one :class:`InputError` line.
- :func:`watch_data_files`: a dataset file changed after start-up (truncated, rewritten) stops the run
  with its name, instead of a SIGBUS or garbage ids; a sample read checks only its own prefix's files.
- :func:`saving`: a checkpoint save that fails midway (disk full, I/O error) stops the run with one line;
  ``latest_checkpointed_iteration.txt`` still names the last complete checkpoint (it is replaced last).
- :func:`print_error_once`: a fault that several ranks raise (every rank of a failed save) is one line.
- :class:`ExitSignal`: SIGTERM/SIGINT under ``--exit-signal-handler``: save at the end of the iteration, exit.

Importing this module changes nothing; every effect starts with an explicit call of an entry point.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid

LOCK_NAME = ".megatron_solo.lock"
HEARTBEAT_S = 10.0   # how often the lock holder refreshes its heartbeat
STALE_S = 60.0       # a heartbeat older than this means the holder is gone (clocks agree within seconds)
PARENT_POLL_S = 0.5


class FaultError(RuntimeError):
    """A condition the user must act on: printed as one ``error:`` line, exit ``exit_code``."""

    exit_code = 1


class InputError(FaultError):
    """A bad input found at start-up (exit 2, like a bad flag)."""

    exit_code = 2


class DataFileError(FaultError):
    pass


class SaveError(FaultError):
    pass


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print_error(msg: str, *, all_ranks: bool = False) -> None:
    """One ``error:`` line on stderr, by rank 0 only unless ``all_ranks`` (a fault seen by one rank)."""
    if all_ranks or global_rank() == 0:
        try:
            print(f"error: {msg}", file=sys.stderr, flush=True)
        except (BrokenPipeError, OSError):  # the terminal or the agent's pipe may be gone
            pass


ONE_LINE_WAIT_S = 5.0  # how long a rank other than 0 waits for rank 0 to report a fault, then reports it


def print_error_once(msg: str) -> None:
    """The run's one ``error:`` line for a fault raised by one rank or by several: every rank raises a
    failed save (megatron-core broadcasts the failure, but only rank 0, its coordinator, holds the per-rank
    details), whichever ranks read a changed data file raise that. Rank 0 prints its line; another rank
    prints its own only when rank 0 has not raised one within ``ONE_LINE_WAIT_S`` (rank 0 may be waiting
    in a collective). The ranks meet in the process group's key-value store (torchrun's agent store), not
    in a collective, which a failed rank may be unable to join; the quiet ranks exit only once the line is
    printed, since torchrun stops every worker as soon as one exits. Without a process group (a world of
    one) or a reachable store, this rank prints."""
    dist = sys.modules.get("torch.distributed")  # never imported here: a fault before torch needs none
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        print_error(msg, all_ranks=True)
        return
    claim, printed = "megatron_solo/error/claim", "megatron_solo/error/printed"
    try:
        store = dist.distributed_c10d._get_default_store()
        if dist.get_rank() != 0:
            # poll: the store's wait() logs a C++ warning when it times out
            deadline = time.monotonic() + ONE_LINE_WAIT_S
            while not store.check([claim]) and time.monotonic() < deadline:
                time.sleep(0.05)
        mine = store.add(claim, 1) == 1
    except Exception:  # no store to meet in: this rank says it
        mine = True
        store = None
    if mine:
        print_error(msg, all_ranks=True)
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(printed, "1")
        return
    deadline = time.monotonic() + ONE_LINE_WAIT_S
    try:
        while not store.check([printed]):
            if time.monotonic() > deadline:  # the rank that claimed the line died before printing it
                print_error(msg, all_ranks=True)
                return
            time.sleep(0.05)
    except Exception:  # the store went with its host (rank 0, without torchrun's agent), after it printed
        pass


# ------------------------------------------------------------------------------ workers and agent
_parent_watch_started = False
_held_lock = None  # the SaveDirLock this process holds (set by guarded_run), released if the agent dies


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_parent() -> bool:
    """Exit this process (code 1, no save) soon after its torchrun agent dies.

    Only under torchrun: a plain ``python -m megatron_solo.train`` under ``nohup`` must survive its shell.
    Linux delivers ``SIGUSR2`` on the parent's death (``PR_SET_PDEATHSIG``); the handler runs between
    bytecodes of the main thread, so a thread polling ``os.getppid()`` covers a main thread blocked in C
    (a collective) and other systems. A ``--save`` lock this process holds is released first.
    Returns whether the watch was started.
    """
    global _parent_watch_started
    if _parent_watch_started or not _under_torchrun():
        return False
    _parent_watch_started = True
    parent = os.getppid()
    leaving = threading.Lock()

    def leave(how: str) -> None:
        if os.getppid() == parent or not leaving.acquire(blocking=False):
            return  # a spurious signal (the thread that started us ended), or already leaving
        print_error(f"the torchrun agent (pid {parent}) is gone ({how}); rank {global_rank()} exits without "
                    f"saving", all_ranks=True)
        try:
            if _held_lock is not None:
                _held_lock.release(join=False)
            # megatron-core's checkpoint writer keeps helper processes (multiprocessing children): they
            # would outlive us and hold the launcher's output pipe open.
            import multiprocessing

            for child in multiprocessing.active_children():
                child.kill()
        finally:
            os._exit(1)

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            # The handler first: SIGUSR2's default action would end the process without releasing the lock.
            previous = signal.signal(signal.SIGUSR2, lambda signum, frame: leave("parent-death signal"))
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR2), 0, 0, 0) != 0:
                signal.signal(signal.SIGUSR2, previous)
        except (OSError, AttributeError, ValueError):  # no prctl, or not the main thread: the thread suffices
            pass

    def poll() -> None:
        while True:
            if os.getppid() != parent:
                leave("parent pid changed")
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=poll, name="megatron_solo-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # died before the watch began
        leave("parent pid changed")
    return True


class ExitSignal:
    """SIGTERM/SIGINT (a scheduler's preemption) are recorded; the loop saves at the end of the iteration
    and exits (``--exit-signal-handler``)."""

    def __init__(self, enabled: bool):
        self.received = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum


# ------------------------------------------------------------------------------ one writer per --save
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


# ------------------------------------------------------------------------------ inputs, before anything
TOKEN_SAMPLE_BYTES = 1 << 20  # per window; three windows (start, middle, end) of each P-tokens.bin, read by
                              # every rank (one read per node from the page cache)


def _index_end(ds, itemsize: int) -> int:
    """The .bin length an index describes: its last sequence's pointer plus its length."""
    if len(ds.sequence_lengths) == 0:
        return 0
    return int(ds.sequence_pointers[-1]) + int(ds.sequence_lengths[-1]) * itemsize


def sampled_token_id_range(bin_path: str, window_bytes: int = TOKEN_SAMPLE_BYTES) -> tuple[int, int]:
    """(smallest, largest) int32 id in three windows (start, middle, end) of a tokens ``.bin``; all of
    it when it is smaller than the three windows.

    A full scan costs one pass over the data (hours at pre-training scale); ids of a foreign tokenizer
    (the usual mistake) are spread over the whole range, so three windows catch them. An id beyond the
    vocabulary in an unsampled place is still refused when read (by the model's embedding).
    """
    import numpy as np

    n = os.path.getsize(bin_path) // 4
    w = max(window_bytes // 4, 1)
    windows = [(0, n)] if n <= 3 * w else [(0, w), ((n - w) // 2, w), (n - w, w)]
    lo, hi = 0, -1
    with open(bin_path, "rb") as f:
        for start, count in windows:
            f.seek(4 * start)
            a = np.fromfile(f, dtype=np.int32, count=count)
            if a.size:
                lo, hi = min(lo, int(a.min())), max(hi, int(a.max()))
    return lo, hi


def check_data_prefix(prefix: str, vocab_size: int) -> None:
    """The three datasets of a prefix exist, their indices read with megatron-core's reader and agree with
    each other and with their ``.bin`` lengths, and a sample of token ids lies in the vocabulary."""
    import numpy as np

    from megatron_solo.data.indexed import DTYPES, STORAGE_SUFFIXES, component_prefix, prefix_storage

    SUFFIXES = STORAGE_SUFFIXES[prefix_storage(prefix)]  # tokens, roles + patches or images, imageidx
    missing = [component_prefix(prefix, n) + ext for n in SUFFIXES for ext in (".idx", ".bin")
               if not os.path.isfile(component_prefix(prefix, n) + ext)]
    if missing:
        raise InputError(f"data prefix {prefix}: missing {', '.join(os.path.basename(m) for m in missing)} "
                         f"(write it with tools/preprocess_data.py --output-prefix {prefix})")
    from megatron.core.datasets.indexed_dataset import _IndexReader

    counts = {}
    for n in SUFFIXES:
        base = component_prefix(prefix, n)
        try:
            index = _IndexReader(base + ".idx", multimodal=False)
        except Exception as e:  # megatron-core asserts on a bad header: say which file
            raise InputError(f"{base}.idx is not a readable megatron-core index ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'bad header'}); re-run tools/preprocess_data.py") from None
        if index.dtype != DTYPES[n]:
            raise InputError(f"{base}.idx holds {np.dtype(index.dtype).name}, SOLO's {n} are "
                             f"{np.dtype(DTYPES[n]).name}; re-run tools/preprocess_data.py")
        want = _index_end(index, np.dtype(index.dtype).itemsize)
        have = os.path.getsize(base + ".bin")
        if have != want:
            raise InputError(f"{base}.bin has {have} bytes, its index describes {want} (truncated or from "
                             f"another run); re-run tools/preprocess_data.py for {prefix}")
        # Views into the memory-mapped index: the reader stays referenced here (its __del__ unmaps them).
        counts[n] = (len(index.sequence_lengths), index.document_indices, index)
    (n_tok, docs, _), others = counts["tokens"], [counts[n] for n in SUFFIXES if n != "tokens"]
    if any(n_o != n_tok or not np.array_equal(d, docs) for n_o, d, _ in others):
        raise InputError(f"data prefix {prefix}: its {', '.join(SUFFIXES)} datasets disagree on segments "
                         f"or packs (written by different runs); re-run tools/preprocess_data.py")
    lo, hi = sampled_token_id_range(component_prefix(prefix, "tokens") + ".bin")
    if lo < 0 or hi >= vocab_size:
        raise InputError(f"{component_prefix(prefix, 'tokens')}.bin holds token id {hi if hi >= vocab_size else lo}, "
                         f"outside the {vocab_size}-piece SOLO vocabulary: it was preprocessed with another "
                         f"tokenizer; re-run tools/preprocess_data.py with SOLO's tokenizer.model")


def check_tokenizer(path: str) -> int:
    """SOLO's pieces at SOLO's ids; returns its vocabulary size."""
    from megatron_solo.data.tokenizer import SoloTokenizer

    try:
        tok = SoloTokenizer(path)
        tok.check_solo_ids()
    except (OSError, RuntimeError, ValueError) as e:
        raise InputError(f"--tokenizer-model {path}: {str(e).splitlines()[0]}") from None
    return tok.vocab_size


SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "patch_dim")


def check_checkpoint_shape(info: dict, model_args, flag: str = "--load") -> None:
    """The checkpoint's model shape (``solo_checkpoint.json``'s ``model_args``) is the one the flags build."""
    import dataclasses

    saved = info.get("model_args") or {}
    want = dataclasses.asdict(model_args)
    diff = [f"{k} {saved.get(k)} (flags: {want[k]})" for k in SHAPE_FIELDS if k in saved and saved[k] != want[k]]
    if diff:
        raise InputError(f"{flag} {info['path']} holds a model with {', '.join(diff)}; pass the checkpoint's "
                         f"--model/--num-layers/--hidden-size ... or another {flag}")


def check_save_dir(save: str) -> None:
    """``--save`` can be created and written (a file created and removed there)."""
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write_test.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--save {save} is not writable ({e.strerror or e}); choose a writable directory") from None


def check_inputs(cfg, *, save_lock: bool = True) -> None:
    """Every input of a run, checked in one process before megatron-core is initialised; raises
    :class:`InputError` (one line) for the first problem. ``cfg`` is a
    :class:`~megatron_solo.training.config.TrainConfig` (the resume plan has read ``--load``'s info).
    ``save_lock``: also refuse a ``--save`` whose lock is live (a launcher's pre-flight; inside a run,
    rank 0 takes the lock instead, and the other ranks must not see their own run's lock as foreign)."""
    from megatron_solo.data import parse_data_path

    vocab = cfg.model_args.vocab_size
    if cfg.tokenizer_model:
        vocab = min(vocab, check_tokenizer(cfg.tokenizer_model))
    prefixes = list(parse_data_path(cfg.data_path)[0])
    if cfg.valid_data_path:
        prefixes += parse_data_path(cfg.valid_data_path)[0]
    for prefix in dict.fromkeys(prefixes):
        check_data_prefix(prefix, vocab)
    if cfg.resume.info is not None:
        check_checkpoint_shape(cfg.resume.info, cfg.model_args,
                               "--save" if cfg.resume.load_dir == cfg.save and cfg.load != cfg.save else "--load")
    if cfg.save:
        check_save_dir(cfg.save)
        if save_lock:
            SaveDirLock(cfg.save).check_free()


# ------------------------------------------------------------------------------ during the run
class _WatchedDataset:
    """One prefix's dataset whose files are checked (size, mtime) before each of its samples is read: a file
    truncated under an open memory map would otherwise end the process with SIGBUS, a rewritten one with
    wrong data. ``files``: the prefix's ``.idx``/``.bin`` paths -> their (size, mtime) at start-up."""

    def __init__(self, dataset, files: dict):
        self.dataset, self.files = dataset, files

    def check(self) -> None:
        for path, (size, mtime) in self.files.items():
            try:
                st = os.stat(path)
            except OSError as e:
                raise DataFileError(f"data file {path} disappeared during the run ({e.strerror})") from None
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                what = "truncated" if st.st_size < size else "rewritten"
                raise DataFileError(f"data file {path} was {what} during the run ({size} -> {st.st_size} "
                                    f"bytes); restore it (or re-run tools/preprocess_data.py) and resume")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.check()
        try:
            return self.dataset[i]
        except Exception:
            self.check()  # a changed file explains the failure: name it
            raise


def _prefix_files(prefix: str) -> dict:
    """The ``.idx``/``.bin`` files of ``prefix`` -> (size, mtime) now."""
    from megatron_solo.data.indexed import STORAGE_SUFFIXES, component_prefix, prefix_storage

    files = {}
    for n in STORAGE_SUFFIXES[prefix_storage(prefix)]:
        for ext in (".idx", ".bin"):
            path = component_prefix(prefix, n) + ext
            st = os.stat(path)
            files[path] = (st.st_size, st.st_mtime_ns)
    return files


def _watch(ds, baselines: dict):
    """``ds`` with each per-prefix dataset in it watched over that prefix's files only. A blend
    (megatron-core's BlendedDataset) is copied with its ``datasets`` replaced by watched ones: its own
    ``__getitem__`` picks the one dataset a sample comes from, so a read checks that prefix alone.
    ``baselines``: prefix -> its files' start-up values, shared by the train and validation sets."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    if isinstance(ds, BlendedDataset):
        blend = copy.copy(ds)  # the caller's object is left as it was
        blend.datasets = [_watch(d, baselines) for d in ds.datasets]
        return blend
    prefix = ds.dataset_path  # a MegatronDataset (SoloDataset) reads the one prefix it was built from
    if prefix not in baselines:
        baselines[prefix] = _prefix_files(prefix)
    return _WatchedDataset(ds, baselines[prefix])


def watch_data_files(train_ds, valid_sets):
    """Wrap the train dataset and validation sets so that a data file changed after start-up stops the run
    with its name. Cost: before each sample is read, one ``stat`` per ``.idx``/``.bin`` of the one prefix
    that sample comes from (8 for an encoded prefix, 6 for a patches one), whatever the number of prefixes
    in the blend; a read that raises re-checks them. The wrappers pickle with the datasets (DataLoader
    workers check in the worker that reads)."""
    baselines = {}
    return _watch(train_ds, baselines), [(name, _watch(ds, baselines)) for name, ds in valid_sets]


@contextlib.contextmanager
def saving(save_dir: str, iteration: int):
    """A failed save (disk full, I/O error, a write refused) becomes one :class:`SaveError` line that says
    which checkpoint is still the last complete one."""
    try:
        yield
    except (FaultError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        from megatron_solo import checkpoint

        last = checkpoint.latest_iteration(save_dir)
        detail = _save_failure_detail(e, save_dir)
        raise SaveError(f"saving iteration {iteration} to {save_dir} failed ({detail}); "
                        f"{'the last complete checkpoint is iteration ' + str(last) if last is not None else 'no complete checkpoint was written'}"
                        f" ({checkpoint.TRACKER} is unchanged): free space or fix the directory, then resume "
                        f"with --load {save_dir}") from e


def _causes(e: BaseException):
    """``e`` and every exception it wraps (causes, contexts, torch checkpoint's per-rank failures)."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__, *x.args]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            stack += [v[0] if isinstance(v, tuple) else v for v in failures.values()]


def _save_failure_detail(e: BaseException, save_dir: str) -> str:
    """The OS error behind a failed save when one is known; megatron-core's writer processes report theirs
    only as text, so a nearly full filesystem is said from its free space."""
    os_error = next((x for x in _causes(e) if isinstance(x, OSError)), None)
    if os_error is not None:
        return str(os_error).splitlines()[0]
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(save_dir).free
        if free < 64 << 20:
            return f"[Errno {errno.ENOSPC}] No space left on device: {free >> 20} MiB free on the filesystem of {save_dir}"
    lines = [l for l in str(e).splitlines() if l.strip()]
    return lines[-1].strip() if lines else type(e).__name__


@contextlib.contextmanager
def guarded_run(cfg):
    """The entry point's frame: inputs checked, the ``--save`` lock held by rank 0 (released on exit, and
    by the parent watch), and a :class:`FaultError` printed as one ``error:`` line with its exit code."""
    global _held_lock
    lock = None
    try:
        check_inputs(cfg, save_lock=False)
        if cfg.save and global_rank() == 0:
            lock = SaveDirLock(cfg.save)
            lock.acquire()
            _held_lock = lock
            if lock.warning:
                print(lock.warning, file=sys.stderr, flush=True)
        yield
    except InputError as e:
        print_error(str(e))  # every rank found it; rank 0 says it
        sys.exit(e.exit_code)
    except FaultError as e:
        print_error_once(str(e))  # raised by one rank or by several (a failed save raises on every rank)
        sys.exit(e.exit_code)
    finally:
        if lock is not None:
            _held_lock = None
            lock.release()
