import gc
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from featureatlas.activation_store.prefetch import Prefetcher


def _counting(stop_after=None, delay=0.0):
    i = 0
    while stop_after is None or i < stop_after:
        if delay:
            time.sleep(delay)
        yield i
        i += 1


def _wait_dead(thread, limit=1.0):
    t0 = time.perf_counter()
    thread.join(limit)
    return not thread.is_alive(), time.perf_counter() - t0


def test_items_arrive_in_order_then_the_stream_ends():
    with Prefetcher(lambda: range(100), depth=3) as it:
        assert list(it) == list(range(100))
    assert not it.thread.is_alive()


def test_a_consumer_that_raises_mid_stream_stops_the_producer_within_a_second():
    it = Prefetcher(_counting(), depth=2)  # infinite, and always ahead of the consumer
    thread = it.thread
    with pytest.raises(RuntimeError, match="consumer failed"):
        for x in it:
            if x == 5:
                raise RuntimeError("consumer failed")
    # no close() and no `with`: the abandoned iterator alone must stop its producer
    del it
    gc.collect()
    dead, waited = _wait_dead(thread)
    assert dead and waited < 1.0


def test_a_context_manager_stops_a_blocked_producer():
    with pytest.raises(KeyError):
        with Prefetcher(_counting(delay=0.001), depth=1) as it:
            next(it)
            time.sleep(0.05)  # the producer is now blocked on the full queue
            raise KeyError("stop")
    dead, _ = _wait_dead(it.thread)
    assert dead


def test_a_producer_exception_is_raised_in_the_consumer_after_the_items_before_it():
    def source():
        yield from range(3)
        raise ValueError("bad row 3")

    got = []
    with pytest.raises(ValueError, match="bad row 3"):
        for x in Prefetcher(source):
            got.append(x)
    assert got == [0, 1, 2]


def test_a_factory_runs_on_the_producer_thread_and_its_generator_is_closed_there():
    seen = {}

    def factory():
        seen["thread"] = threading.current_thread()
        try:
            yield from _counting()
        finally:
            seen["closed_on"] = threading.current_thread()

    it = Prefetcher(factory, depth=2)
    assert next(it) == 0
    assert it.close()
    assert seen["thread"] is it.thread and seen["closed_on"] is it.thread
    with pytest.raises(StopIteration):
        next(it)


def test_store_batches_use_the_prefetcher_and_stop_when_the_consumer_raises(tmp_path):
    from featureatlas.activation_store.store import write_store

    rng = np.random.default_rng(0)
    store = write_store(tmp_path / "s.h5", {"h": rng.standard_normal((64 * 8, 4)).astype(np.float32)},
                        rng.integers(0, 9, (64, 8)))
    it = store.batches("h", 16)
    assert isinstance(it, Prefetcher)
    thread = it.thread
    with pytest.raises(ZeroDivisionError):
        for i, _ in enumerate(it):
            if i == 3:
                1 / 0
    del it
    gc.collect()
    assert _wait_dead(thread)[0]


@pytest.mark.parametrize("where", ["consumer", "producer"])
def test_a_process_that_raises_mid_stream_exits_cleanly(tmp_path, where):
    """The producer reads h5py and places arrays with jax while the main thread dies of an exception:
    the process must exit with the exception's code (1), not hang, not crash (SIGSEGV) at exit."""
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from featureatlas.activation_store.prefetch import Prefetcher
        from featureatlas.activation_store.store import write_store
        rng = np.random.default_rng(0)
        store = write_store({str(tmp_path / "s.h5")!r}, {{"h": rng.standard_normal((256 * 16, 64)).astype(np.float32)}},
                            rng.integers(0, 9, (256, 16)), commit_contexts=8)
        its = [store.batches("h", 32, seed=s, prefetch=2) for s in range(3)]  # several live producers

        def failing():
            for i in range(10**6):
                if i == 20:
                    raise RuntimeError("producer failed mid-stream")
                yield jax.device_put(store.read_rows("h", np.arange(i, i + 32)))

        source = its[0] if {where!r} == "consumer" else Prefetcher(failing, 2)
        for i, x in enumerate(source):
            if i == 20:
                raise RuntimeError("consumer failed mid-stream")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"{where} failed mid-stream" in proc.stderr
    assert "Fatal Python error" not in proc.stderr and "Segmentation" not in proc.stderr
