"""One background producer: runs an iterator on a thread, a few items ahead of its consumer.

    with Prefetcher(lambda: read_batches(path), depth=4) as batches:
        for x in batches:
            train_step(x)

Every long job that overlaps reading (or computing) with consuming uses this class: the store reader,
SNMF streaming, the harvest's forward pass, the SAE batch sources. Its guarantees:

* **Stoppable.** `close()` asks the producer to stop and joins its thread. The producer checks the
  request between items and while waiting for room in the queue (a put with a short timeout in a
  loop), so a consumer that stops reading, or raises, never leaves the producer blocked for ever:
  the thread exits within one item's production time plus `POLL_S`.
* **Errors cross over.** An exception raised by the producer is re-raised in the consumer, at the
  position in the stream where it happened (items produced before it are delivered first).
* **Abandonment is safe.** The thread holds no reference to the `Prefetcher` object, so a consumer
  that drops it without closing (e.g. an exception unwinding a `for` loop) lets it be collected,
  which stops the producer.
* **Clean exit.** A daemon thread still inside h5py or a JAX call while the interpreter finalises
  can crash the process (seen as SIGSEGV at exit after a run that otherwise succeeded). An `atexit`
  hook, re-registered at every start so that it runs before the handlers of libraries imported
  later (atexit runs last-registered first), stops and joins every producer still alive.

If `source` is a zero-argument callable it is called on the producer thread, so that resources the
iteration needs (an open HDF5 file) are created, used and closed on one thread; a generator's
`close()` is called on the producer thread when it stops early, running its `finally` blocks there.
"""
from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import weakref
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar, Union

T = TypeVar("T")

POLL_S = 0.05  # how often a waiting producer or consumer re-checks the stop request
EXIT_JOIN_S = 10.0  # how long interpreter exit waits for each producer to finish its current item

_END = object()


class _Failure(NamedTuple):
    """An exception raised by the producer, carried through the queue to the consumer."""

    error: BaseException


class _Worker:
    """The producer's state: everything the thread touches (never the Prefetcher itself)."""

    def __init__(self, source, depth: int, name: str):
        self.source = source
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)

    def put(self, item) -> bool:
        """Queue `item`, waiting for room; False once a stop was requested."""
        while not self.stop.is_set():
            with contextlib.suppress(queue.Full):
                self.queue.put(item, timeout=POLL_S)
                return True
        return False

    def run(self) -> None:
        iterator = None
        try:
            source = self.source() if callable(self.source) else self.source
            iterator = iter(source)
            for item in iterator:
                if not self.put(item):
                    return
            self.put(_END)
        except BaseException as err:  # re-raised in the consumer's thread
            self.put(_Failure(err))
        finally:
            # A generator's finally blocks (closing files) run here, on this thread. An iterator without
            # close (or none made: the source failed) raises AttributeError, suppressed like close's errors.
            with contextlib.suppress(Exception):
                iterator.close()
            self.source = None
            _LIVE.discard(self)

    def shutdown(self, timeout: float | None) -> bool:
        """Request a stop and join; True if the thread has ended."""
        self.stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        return not self.thread.is_alive()


_LIVE: set[_Worker] = set()
_LIVE_LOCK = threading.Lock()


def stop_all(timeout: float = EXIT_JOIN_S) -> None:
    """Stop and join every live producer (the atexit hook; also useful in tests)."""
    with _LIVE_LOCK:
        workers = list(_LIVE)
    for w in workers:
        w.stop.set()
    for w in workers:
        w.shutdown(timeout)


class Prefetcher(Iterator[T]):
    """Iterate `source` on a background thread, keeping up to `depth` items ready.

    source: an iterable, or a zero-argument callable returning one (called on the producer thread).
    depth: items produced ahead of the consumer (memory: depth + 1 items at most in flight).
    Iterating yields the source's items in order, then stops; a producer exception is re-raised
    here. Use as a context manager, or call `close()`, to stop early.
    """

    def __init__(self, source: Union[Iterable[T], Callable[[], Iterable[T]]], depth: int = 4, *,
                 name: str = "featureatlas-prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._worker = _Worker(source, depth, name)
        self._done = False
        # Moving the exit hook to the end of atexit's list makes it run before the exit handlers of
        # libraries (jax) imported after the previous registration.
        atexit.unregister(stop_all)
        atexit.register(stop_all)
        with _LIVE_LOCK:
            _LIVE.add(self._worker)
        # Collecting an abandoned Prefetcher stops its producer (the thread does not keep it alive).
        self._finalizer = weakref.finalize(self, self._worker.stop.set)
        self._worker.thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._worker.thread

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def __next__(self) -> T:
        w = self._worker
        while not self._done:
            try:
                item = w.queue.get(timeout=POLL_S)
            except queue.Empty:
                if w.stop.is_set() or not w.thread.is_alive() and w.queue.empty():
                    self._done = True  # closed, or the producer ended without a word (cannot happen)
                continue
            if item is _END:
                self._done = True
                break
            if isinstance(item, _Failure):
                self.close()
                raise item.error
            return item
        raise StopIteration

    def close(self, timeout: float | None = EXIT_JOIN_S) -> bool:
        """Stop the producer and join its thread (waits for the item in production); True if joined."""
        self._done = True
        return self._worker.shutdown(timeout)

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Prefetcher", "stop_all", "POLL_S"]
