"""Feeding a net its source layers' batches: in this process, or from worker processes.

:class:`NetFeeder` reads every source layer of one net together (the readers
of :mod:`.data`; Input tops from the caller's :data:`Feed`), in this process
(one batch ahead in a thread with ``prefetch``) or, with ``workers``, through
a :class:`WorkerPool`.  Worker ``w`` of ``N`` skips to batch ``w`` (the
readers' ``skip_batch``: their state moves, nothing is read), makes it, skips
``N - 1``, makes batch ``w + N``...; the parent takes batch ``b`` from worker
``b mod N``: the very batches, in the very order, that one process reading in
turn gives, for any ``N``, after a resume's skip too.  Batches come back
through shared memory (slots the parent owns and reuses), not as pickled
copies.
"""

from __future__ import annotations

import os
import signal
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from google.protobuf.message import Message

from ...errors import CaffeFtError
from ...formats.schema import Schema
from .data import READERS, POOLED

#: ``feed(pass_index)`` -> arrays for the Input tops of a net, by top name.
Feed = Callable[[int], Mapping[str, np.ndarray]]


def default_workers() -> int:
    """Worker processes per net when not told: ``min(4, usable cores) - 1``, at least one (1 to 3),
    leaving a core to the training process.

    Under torchrun the cores are shared out between the machine's processes first."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(4, cores) - 1)


# ------------------------------------------------------------- worker processes --

#: Shared-memory slots per worker: the batch the caller holds and the ones made ahead.
DEPTH = 3
_ALIGN = 64


class _SlotAlloc:
    """A worker's ``alloc``: arrays laid out one after the other in a slot, while they fit
    (the readers then write a batch straight into it); beyond, private arrays."""

    def __init__(self, memory: Any) -> None:
        self.memory, self.offset = memory, 0
        self.placed: List[Tuple[np.ndarray, int]] = []

    def __call__(self, shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.memory is None or self.offset + size > self.memory.size:
            return np.empty(shape, dtype)
        array = _view(self.memory, dtype, shape, self.offset)
        self.placed.append((array, self.offset))
        self.offset += -(-size // _ALIGN) * _ALIGN
        return array

    def layout(self, batch: Mapping[str, np.ndarray]) -> Optional[List[Tuple[str, str, Tuple[int, ...], int]]]:
        """Where each top's array lies in the slot; None when one does not (the batch goes pickled)."""
        found = []
        for top, array in batch.items():
            offset = next((at for placed, at in self.placed if placed is array), None)
            if offset is None:
                return None
            found.append((top, array.dtype.str, tuple(array.shape), offset))
        return found


class _Spec:
    """What a worker process needs to make its readers (plain data: it crosses a 'spawn')."""

    def __init__(self, schema: Schema, layers: Sequence[Message], phase: str, seed: int, rank: int,
                 world: int, workers: int) -> None:
        # The schema's own text, so the worker reads the very schema (not one found again by path).
        self.schema = (schema.path, getattr(schema, "_text"))
        self.layers = [layer.SerializeToString() for layer in layers]
        self.phase, self.seed, self.rank, self.world, self.workers = phase, seed, rank, world, workers


def _failure(exc: Exception) -> Tuple[str, Any]:
    """What a worker sends for an exception: a CaffeFtError's parts (to be raised again as
    it was), or another exception's traceback (a bug, shown with its place)."""
    if isinstance(exc, CaffeFtError):
        return "error", (exc.message, exc.path, exc.line, exc.column, exc.layer)
    import traceback

    return "crash", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _work(conn: Any, spec: _Spec, first: int) -> None:
    """A worker process: skip to batch ``first``, then for every credit the parent
    sends make a batch, hand it over and skip the other workers' batches.

    A credit is ``(slot, shared memory name or None)``; the answer ``("shm",
    slot, layout)`` (the arrays written into that slot), ``("pickled", slot,
    arrays)`` (no slot yet, or too small), ``("error", slot, parts)`` (a
    CaffeFtError, rebuilt by the parent) or ``("crash", slot, traceback)``.
    ``None`` or the parent's end closing stops it."""
    # Ctrl-C and SIGTERM are the parent's to handle: it finishes the iteration, snapshots, then stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import cv2

        cv2.setNumThreads(1)  # the parallelism is the workers
    except ImportError:
        pass
    from multiprocessing import shared_memory

    attached: Dict[int, Any] = {}
    failure: Optional[Tuple[str, Any]] = None
    readers: List[Any] = []
    try:
        try:
            schema = Schema(*spec.schema)
            for data in spec.layers:
                layer = schema.new("LayerParameter")
                layer.ParseFromString(data)
                readers.append(READERS[layer.type](layer, schema, spec.phase, spec.seed, spec.rank, spec.world))
            for _ in range(first):
                for reader in readers:
                    reader.skip_batch()
        except Exception as exc:  # noqa: BLE001 - said at this worker's first batch
            failure = _failure(exc)
        while True:
            credit = conn.recv()
            if credit is None:
                return
            slot, name = credit
            memory = attached.get(slot)
            if name is not None and (memory is None or memory.name != name.lstrip("/")):
                if memory is not None:
                    _close(memory)
                memory = attached[slot] = shared_memory.SharedMemory(name=name)
            alloc = _SlotAlloc(memory if name is not None else None)
            if failure is None:
                try:
                    batch: Dict[str, np.ndarray] = {}
                    for reader in readers:
                        batch.update(reader.next(alloc))
                except Exception as exc:  # noqa: BLE001 - the parent raises it
                    failure = _failure(exc)
            if failure is not None:
                conn.send((failure[0], slot, failure[1]))
                continue
            layout = alloc.layout(batch)
            if layout is not None:
                conn.send(("shm", slot, layout))
            else:
                conn.send(("pickled", slot, batch))
            del batch, alloc  # no view of a slot outlives its turn
            try:
                for _ in range(spec.workers - 1):
                    for reader in readers:
                        reader.skip_batch()
            except Exception as exc:  # noqa: BLE001 - the batch's own worker reports it first
                failure = _failure(exc)
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the parent is gone or stopped us
    finally:
        for memory in attached.values():
            _close(memory)


def _view(memory: Any, dtype: Any, shape: Tuple[int, ...], offset: int) -> np.ndarray:
    """An array in a slot.  ``np.frombuffer`` (unlike ``np.ndarray(buffer=...)``) holds an export
    of the slot's buffer, so the slot cannot be unmapped under it (see :func:`_close`)."""
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(memory.buf, dtype, count, offset).reshape(shape)


def _close(memory: Any) -> None:
    """Let go of a slot.  While views of it are held (a batch kept past its turn), the mapping
    stays with them, and goes when they go, instead of leaving them dangling."""
    try:
        memory.close()
    except BufferError:
        memory._buf = memory._mmap = None  # the views keep the mapping; close() then shuts the descriptor only
        memory.close()


def _nbytes(batch: Mapping[str, np.ndarray]) -> int:
    """The bytes a batch takes in a slot (each array aligned as :class:`_SlotAlloc` lays them out)."""
    return sum(-(-array.nbytes // _ALIGN) * _ALIGN for array in batch.values())


def _shut_down(processes: List[Any], conns: List[Any], slots: List[List[Any]]) -> None:
    """Stop the workers (asked, then terminated, then killed) and free the shared memory."""
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
        conn.close()  # a worker blocked on sending a batch gets EPIPE
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.terminate()
            process.join(2)
        if process.is_alive():
            process.kill()
            process.join()
    for memories in slots:
        for memory in memories:
            if memory is not None:
                _close(memory)
                try:
                    memory.unlink()
                except FileNotFoundError:
                    pass
        memories[:] = [None] * len(memories)
    processes.clear()
    conns.clear()


def _start_bare(process: Any) -> None:
    """Start a 'spawn' process without running the caller's main script in it.

    'spawn' imports the parent's ``__main__`` in the child (so that functions
    defined there can be found); the workers need nothing from it, and a
    script without an ``if __name__ == "__main__"`` guard would run again in
    every worker.  So the child is shown a bare ``__main__`` while it starts."""
    import sys
    import types

    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        process.start()
    finally:
        sys.modules["__main__"] = main


class WorkerPool:
    """The data layers of one net read by ``workers`` processes (started with 'spawn': no
    torch, no threads inherited), batch ``b`` by worker ``b mod workers``.

    ``next()`` gives the batches that the layers' own ``next()`` would give in
    turn, from batch ``start`` on.  Each worker has :data:`DEPTH` shared-memory
    slots that this process creates, reuses and frees: the readers write a
    batch straight into one, and ``next()`` gives views of it, which stay valid
    until the following ``next()`` (the slot then goes back to its worker) or
    :meth:`close`: no copy on either side.  A worker's first batches (before
    their slot is sized), a batch larger than its slot, and every batch when
    /dev/shm has no room come pickled instead.  An error in a worker is raised
    here, at the batch it belongs to, as the CaffeFtError it was; the pool is
    then closed.  :meth:`close` (also run when the pool is collected and at
    exit) stops the workers and frees the memory.
    """

    def __init__(self, layers: Sequence[Message], schema: Schema, phase: str, seed: int, rank: int, world: int,
                 workers: int, start: int = 0) -> None:
        import multiprocessing

        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        context = multiprocessing.get_context("spawn")
        self.names = ", ".join(layer.name for layer in layers)
        spec = _Spec(schema, layers, phase, seed, rank, world, workers)
        self.processes: List[Any] = []
        self.conns: List[Any] = []
        self.slots: List[List[Any]] = [[None] * DEPTH for _ in range(workers)]
        self._finalizer = weakref.finalize(self, _shut_down, self.processes, self.conns, self.slots)
        self.turn = 0
        self._lent: Optional[Tuple[int, int]] = None  # (worker, slot) of the batch the caller holds
        for index in range(workers):
            ours, theirs = context.Pipe()
            process = context.Process(target=_work, args=(theirs, spec, start + index), daemon=True,
                                      name=f"caffe-ft-data-{index}")
            _start_bare(process)
            theirs.close()  # so that the worker's end closing shows here as EOF
            self.processes.append(process)
            self.conns.append(ours)
            for slot in range(DEPTH):
                ours.send((slot, None))

    @property
    def pids(self) -> List[int]:
        return [process.pid for process in self.processes]

    def next(self) -> Dict[str, np.ndarray]:
        """The next batch; its arrays may be views of a slot, valid until the next call."""
        if not self.processes:
            raise CaffeFtError("the data workers were stopped", layer=self.names)
        if self._lent is not None:
            self._give_back(*self._lent)
            self._lent = None
        index = self.turn
        self.turn = (index + 1) % len(self.processes)
        try:
            kind, slot, payload = self.conns[index].recv()
        except (EOFError, OSError):
            process = self.processes[index]
            process.join(1)
            self.close()
            why = f"exit code {process.exitcode}"
            if process.exitcode == -signal.SIGBUS:
                why += ": out of shared memory? (/dev/shm; --data-workers 0 reads without it)"
            raise CaffeFtError(f"a data worker stopped unexpectedly ({why})", layer=self.names) from None
        if kind == "error":
            self.close()
            raise CaffeFtError(*payload)
        if kind == "crash":
            self.close()
            raise RuntimeError(f"a data worker of layer(s) {self.names} failed:\n{payload}")
        if kind == "pickled":
            self._size(index, _nbytes(payload), slot)
            self._give_back(index, slot)
            return payload  # type: ignore[no-any-return]
        memory = self.slots[index][slot]
        self._lent = (index, slot)
        return {top: _view(memory, dtype, shape, offset) for top, dtype, shape, offset in payload}

    def _give_back(self, index: int, slot: int) -> None:
        """The slot's turn is over: the worker may fill it again."""
        memory = self.slots[index][slot]
        self.conns[index].send((slot, None if memory is None else memory.name))

    def _size(self, index: int, size: int, back: int) -> None:
        """Slots of ``size`` bytes for a worker: the one it has just handed back (``back``) when
        too small, and those it has not been told of yet (it uses neither now)."""
        from multiprocessing import shared_memory

        for slot, memory in enumerate(self.slots[index]):
            if memory is not None and (memory.size >= size or slot != back):
                continue
            try:
                room = os.statvfs("/dev/shm")
                if size > room.f_bavail * room.f_frsize // 2:
                    return  # no room: the batches come pickled
            except OSError:
                pass
            if memory is not None:
                _close(memory)
                memory.unlink()
            self.slots[index][slot] = shared_memory.SharedMemory(create=True, size=max(size, 1))

    def close(self) -> None:
        """Stop the workers and free the slots (again: nothing)."""
        self._finalizer()


class NetFeeder:
    """Every source layer of one net, read together: ``next()`` gives one pass's inputs.

    With ``workers`` > 0 the data layers (ImageData, Data, HDF5Data, WindowData) are read
    by that many worker processes (:class:`WorkerPool`, started at the first
    batch); otherwise here, and with ``prefetch`` one batch ahead in a
    background thread while the caller trains on this one (OpenCV decoding and
    LMDB reads release the GIL).  Either way: the same batches in the same
    order, and an error in a batch is raised when that batch is asked for.
    The caller's ``feed`` and DummyData are read in ``next()`` itself.  A
    batch's arrays are the caller's until the next ``next()``: with workers
    they lie in shared memory that is then filled again (copy what must live on).
    :meth:`close` stops the workers (the end of a run; also done at exit).
    """

    def __init__(self, sources: Sequence[Message], schema: Schema, phase: str, feed: Optional[Feed] = None,
                 seed: int = 0, rank: int = 0, world: int = 1, prefetch: bool = False, workers: int = 0) -> None:
        self.readers: List[Any] = []
        self.inputs: List[str] = []
        self.feed = feed
        self.passes = 0
        self.prefetch = prefetch
        self._worker: Optional[ThreadPoolExecutor] = None
        self._pending: Optional["Future[Dict[str, np.ndarray]]"] = None
        self._pooled: List[Message] = []
        self._args = (schema, phase, seed, rank, world)
        self.workers = workers
        self.pool: Optional[WorkerPool] = None
        for layer in sources:
            if layer.type in READERS:
                # Built here in any case: a missing list, LMDB or file is said before any work.
                reader = READERS[layer.type](layer, schema, phase, seed, rank, world)
                if workers > 0 and layer.type in POOLED:
                    self._pooled.append(layer)
                else:
                    self.readers.append(reader)
            elif layer.type == "Input":
                self.inputs.extend(layer.top)
            else:
                raise CaffeFtError(f"the torch engine cannot read '{layer.type}' data (ImageData, Data (LMDB), "
                                   "HDF5Data, DummyData, WindowData and Input only)", layer=layer.name)
        if self.inputs and feed is None:
            raise CaffeFtError(f"the net reads its data from Input layers ({', '.join(self.inputs)}), "
                               "which only a caller can feed; train with a data layer (ImageData)")

    def next(self) -> Dict[str, np.ndarray]:
        out = self._read()
        if self.feed is not None:
            out.update(self.feed(self.passes))
        self.passes += 1
        return out

    def _read_now(self) -> Dict[str, np.ndarray]:
        out: Dict[str, np.ndarray] = {}
        for reader in self.readers:
            out.update(reader.next())
        return out

    def _read(self) -> Dict[str, np.ndarray]:
        """The data layers' next batch: the one read ahead, and the one after it started."""
        if self._pooled:
            if self.pool is None:
                self.pool = WorkerPool(self._pooled, *self._args, workers=self.workers, start=self.passes)
            out = self.pool.next()
            out.update(self._read_now())
            return out
        if not self.prefetch or not self.readers:
            return self._read_now()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="caffe-ft-data")
        pending = self._pending or self._worker.submit(self._read_now)
        self._pending = None
        batch = pending.result()
        self._pending = self._worker.submit(self._read_now)
        return batch

    def skip(self, passes: int) -> None:
        """Drop ``passes`` batches (a resumed run reads on where the first one was).

        Before any batch is read, the readers (and the workers, which start
        ``passes`` on) move their state on without reading or decoding anything."""
        if self.pool is None and self._pending is None:
            for _ in range(passes):
                for reader in self.readers:
                    reader.skip_batch()
        else:
            for _ in range(passes):
                self._read()
        self.passes += passes

    def close(self) -> None:
        """Stop the worker processes and the read-ahead thread (the feeder reads no more)."""
        if self.pool is not None:
            self.pool.close()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
            self._pending = None
