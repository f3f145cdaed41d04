"""A node's weight mailbox: the shared-memory weight transport (DESIGN.md "Weight sync", one node).

The object-store transport copies every version into a fresh object and back out of it, and the
fresh object's pages fault in each time (benchmarks/weight_sync.py: a 400 MB `ray.put` takes 34 ms
into pages the store has touched before and 145-260 ms into new ones). Generators on the learner's
node need neither: learner rank 0 keeps one file in /dev/shm mapped for the whole run and copies
each version into it with `memcpy`; the engines keep it mapped too. An engine that can serve its
parameters from shared memory (the HF engine, on CPU) points them at the mailbox, so receiving a
version costs no copy at all and N engines on a node hold one copy of the weights between them; an
engine with its own weight layout (vLLM, which repacks weights for its CPU kernels) reloads from the
mapped views, one copy.

Two slots, so a version can be written while the engines still serve the one before (async mode):
each write goes to the slot that does not hold the latest version. A write never touches a slot
an engine still serves: engines that point their parameters at a slot record (pid, slot) in the
header's reader table, and the writer refuses a slot a live reader holds. Nothing here is Ray; the
visibility of a write to the engines comes from the call that tells them to load (Ray's RPC), not
from the header, so no cross-process atomics are needed.

File layout: a 4 KiB header of int64 words (magic, slot size, the version in each slot, the latest
slot, the creator's pid, then the reader table), then the two slots. Each tensor sits at a 64-byte
aligned offset of its slot, in the order of the layout.
"""
from __future__ import annotations

import mmap
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

MAGIC = 0x726C5F7765696768   # "rl_weigh"
HEADER_BYTES = 4096
_MAGIC, _SLOT_BYTES, _SLOT_VERSION, _LATEST, _CREATOR, _READERS = 0, 1, 2, 4, 5, 8
MAX_READERS = (HEADER_BYTES // 8 - _READERS) // 2   # reader table: (pid, slot + 1) pairs
ALIGNMENT = 64
DEFAULT_DIRECTORY = Path("/dev/shm")
FILE_PREFIX = "rl_service-weights-"


@dataclass(frozen=True)
class MailboxLayout:
    """Where each tensor of one version sits in a slot (the same at every version)."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    offsets: tuple[int, ...]
    tensor_bytes: tuple[int, ...]
    slot_bytes: int

    @classmethod
    def of(cls, entries: Iterable[tuple[str, Sequence[int], str | torch.dtype]]) -> "MailboxLayout":
        names, shapes, dtypes, offsets, sizes, cursor = [], [], [], [], [], 0
        for name, shape, dtype in entries:
            dtype_name = str(dtype).removeprefix("torch.")
            item = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
            cursor = -(-cursor // ALIGNMENT) * ALIGNMENT
            names.append(name), shapes.append(tuple(int(size) for size in shape))
            dtypes.append(dtype_name), offsets.append(cursor)
            sizes.append(int(np.prod(shape, dtype=np.int64)) * item)
            cursor += sizes[-1]
        slot_bytes = max(-(-cursor // mmap.PAGESIZE) * mmap.PAGESIZE, mmap.PAGESIZE)
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(offsets), tuple(sizes), slot_bytes)

    @property
    def num_bytes(self) -> int:
        """The bytes of one version (the tensors alone, no alignment padding)."""
        return sum(self.tensor_bytes)

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + 2 * self.slot_bytes


@dataclass(frozen=True)
class MailboxWeights:
    """One published version, as the driver hands it to the engines: where to read it."""
    path: str
    node_id: str
    slot: int
    version: int
    num_bytes: int
    layout: MailboxLayout


def room_for(layout: MailboxLayout, directory: Path = DEFAULT_DIRECTORY) -> bool:
    """Whether `directory` (a tmpfs) has space for the mailbox (containers often get a 64 MB /dev/shm)."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize >= layout.file_bytes


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(directory: Path = DEFAULT_DIRECTORY) -> list[Path]:
    """Delete mailboxes whose creator died without removing them (a killed learner): each holds two
    model copies of tmpfs memory. The creator's pid is the last part of the file name."""
    removed = []
    for path in directory.glob(f"{FILE_PREFIX}*"):
        try:
            pid = int(path.name.rsplit("-", 1)[-1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _remove_when_gone(pid: int, path: Path) -> None:
    """Remove `path` once process `pid` has exited, however it ends: a SIGKILLed driver takes its
    local Ray and this learner with it, and no cleanup of ours runs then. A tiny shell loop,
    polling once a second, detached twice: in its own session (the kill of the actor's process
    group spares it) and no longer our child (a Ray worker that exits kills its direct children,
    RAY_kill_child_processes_on_worker_exit, which raced with the loop when the driver was killed)."""
    import subprocess

    # A zombie still answers `kill -0`: where nothing reaps the learner (its raylet died with the
    # driver, and PID 1 of a container may not reap), its /proc status says Z and it counts as gone.
    loop = ('while kill -0 "$1" 2>/dev/null && ! grep -qs "^State:[[:space:]]*Z" "/proc/$1/status"; do sleep 1; done; '
            'rm -f -- "$2"')
    try:
        launcher = subprocess.Popen(["sh", "-c", f"( {loop} ) </dev/null >/dev/null 2>&1 &",
                                     "rl_service-mailbox-cleanup", str(pid), str(path)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    close_fds=True, start_new_session=True)
        launcher.wait(timeout=10)   # returns at once: the loop runs on in the background
    except (OSError, subprocess.TimeoutExpired):   # no shell: the next mailbox's remove_orphans still finds it
        pass


def _array_view(mapping: mmap.mmap, offset: int, count: int) -> np.ndarray:
    return np.frombuffer(mapping, dtype=np.uint8, count=count, offset=offset)


class WeightMailbox:
    """The learner's end (`create`, `write`) and an engine's end (`open`, `tensors`, `hold`)."""

    def __init__(self, path: Path, layout: MailboxLayout, writer: bool):
        self.path, self.layout, self.writer = Path(path), layout, writer
        descriptor = os.open(self.path, os.O_RDWR)
        try:
            if os.fstat(descriptor).st_size != layout.file_bytes:
                raise ValueError(f"weight mailbox {self.path}: {os.fstat(descriptor).st_size} bytes, "
                                 f"the layout needs {layout.file_bytes}")
            # The header is writable at both ends (engines record what they hold); the slots only
            # at the learner's, so an engine's stray write cannot corrupt the published weights.
            self._header_map = mmap.mmap(descriptor, HEADER_BYTES, access=mmap.ACCESS_WRITE)
            self._slots_map = mmap.mmap(descriptor, 2 * layout.slot_bytes, offset=HEADER_BYTES,
                                        access=mmap.ACCESS_WRITE if writer else mmap.ACCESS_READ)
        finally:
            os.close(descriptor)
        self.header = np.frombuffer(self._header_map, dtype=np.int64)
        if int(self.header[_MAGIC]) != MAGIC or int(self.header[_SLOT_BYTES]) != layout.slot_bytes:
            raise ValueError(f"{self.path} is not a weight mailbox of this layout")
        self._entries = {name: index for index, name in enumerate(layout.names)}

    @classmethod
    def create(cls, layout: MailboxLayout, tag: str = "", directory: Path = DEFAULT_DIRECTORY) -> "WeightMailbox":
        """A new mailbox file, named `<prefix><tag>-<random>-<pid>` so orphans can be told apart."""
        remove_orphans(directory)
        safe_tag = "".join(char if char.isalnum() else "_" for char in tag)[:40]
        path = Path(directory) / f"{FILE_PREFIX}{safe_tag}-{uuid.uuid4().hex[:8]}-{os.getpid()}"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(descriptor, layout.file_bytes)
            header = np.zeros(HEADER_BYTES // 8, dtype=np.int64)
            header[[_MAGIC, _SLOT_BYTES, _SLOT_VERSION, _SLOT_VERSION + 1, _LATEST, _CREATOR]] = [
                MAGIC, layout.slot_bytes, -1, -1, -1, os.getpid()]
            os.pwrite(descriptor, header.tobytes(), 0)
        finally:
            os.close(descriptor)
        _remove_when_gone(os.getpid(), path)
        mailbox = cls(path, layout, writer=True)
        # Fault every page in now, at start-up: the first two publications would otherwise pay it
        # (381 MiB: 280 ms instead of 42).
        np.frombuffer(mailbox._slots_map, dtype=np.uint8).fill(0)
        return mailbox

    # -- the learner's end -------------------------------------------------------------------------
    def free_slot(self) -> int:
        """The slot the next write goes to: not the latest version's, and held by no live engine."""
        latest = int(self.header[_LATEST])
        slot = 0 if latest < 0 else 1 - latest
        holders = [(index, pid) for index, pid, held in self.readers() if held == slot and _pid_alive(pid)]
        if holders:
            raise RuntimeError(f"weight mailbox {self.path}: slot {slot} (version {int(self.header[_SLOT_VERSION + slot])}) "
                               f"is still served by engine(s) {holders} (index, pid), which did not load "
                               f"version {int(self.header[_SLOT_VERSION + 1 - slot])}; it cannot be overwritten")
        return slot

    def write(self, named_arrays: Iterable[tuple[str, np.ndarray]], version: int) -> int:
        """Copy one version (name, uint8 bytes of the tensor) into the free slot; returns the slot.
        Every tensor of the layout must come exactly once (ZeRO-3 hands them over bucket by bucket)."""
        if not self.writer:
            raise PermissionError("only the learner writes the weight mailbox")
        slot = self.free_slot()
        self.header[_SLOT_VERSION + slot] = -1   # half-written until the end
        seen = set()
        base = slot * self.layout.slot_bytes
        for name, array in named_arrays:
            index = self._entries.get(name)
            if index is None:
                raise KeyError(f"weight mailbox has no tensor named {name!r}")
            expected = self.layout.tensor_bytes[index]
            if array.nbytes != expected:
                raise ValueError(f"weight mailbox: {name} has {array.nbytes} bytes, the layout says {expected}")
            if expected:
                np.copyto(_array_view(self._slots_map, base + self.layout.offsets[index], expected),
                          array.reshape(-1).view(np.uint8))
            seen.add(name)
        if len(seen) != len(self.layout.names):
            missing = [name for name in self.layout.names if name not in seen]
            raise ValueError(f"weight mailbox: version {version} lacks {missing[:5]}")
        self.header[_SLOT_VERSION + slot] = version
        self.header[_LATEST] = slot
        return slot

    def close(self, remove: bool | None = None) -> None:
        """Unmap; the learner's end also removes the file (engines keep their mapping until they close)."""
        del self.header
        self._header_map.close()
        self._slots_map.close()
        if self.writer if remove is None else remove:
            self.path.unlink(missing_ok=True)

    # -- an engine's end ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, layout: MailboxLayout) -> "WeightMailbox":
        return cls(Path(path), layout, writer=False)

    def tensors(self, slot: int, version: int) -> list[tuple[str, torch.Tensor]]:
        """(name, read-only tensor view) of the version in `slot`; refuses if the slot holds another."""
        held = int(self.header[_SLOT_VERSION + slot])
        if held != version:
            raise ValueError(f"weight mailbox {self.path}: slot {slot} holds version {held}, not {version}")
        base = slot * self.layout.slot_bytes
        named = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            for index, name in enumerate(self.layout.names):
                dtype = getattr(torch, self.layout.dtypes[index])
                shape = self.layout.shapes[index]
                count = int(np.prod(shape, dtype=np.int64))
                if count == 0:
                    named.append((name, torch.empty(shape, dtype=dtype)))
                    continue
                view = torch.frombuffer(self._slots_map, dtype=dtype, count=count,
                                        offset=base + self.layout.offsets[index])
                named.append((name, view.view(shape)))
        return named

    def hold(self, reader: int, slot: int | None) -> None:
        """Record that engine `reader` serves its parameters from `slot` (None: from its own memory)."""
        if not 0 <= reader < MAX_READERS:
            raise ValueError(f"weight mailbox reader index {reader} outside [0, {MAX_READERS})")
        word = _READERS + 2 * reader
        self.header[word] = os.getpid()
        self.header[word + 1] = 0 if slot is None else slot + 1

    def readers(self) -> list[tuple[int, int, int | None]]:
        """(reader index, pid, slot held or None) of every reader that has recorded itself."""
        table = self.header[_READERS:_READERS + 2 * MAX_READERS].reshape(-1, 2)
        return [(index, int(pid), int(held) - 1 if held else None)
                for index, (pid, held) in enumerate(table) if pid]
