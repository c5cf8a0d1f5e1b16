"""Read the next training batches in a background thread while the current step runs.

``Prefetcher(fetch, count, depth)`` calls ``fetch()`` ``count`` times in order on its own thread, keeping at
most ``depth`` results ready; ``next()`` returns them in the same order, so the batches are exactly those
of the synchronous path.  An exception raised by ``fetch`` is raised by the ``next()`` that would have
returned its result.  Reading memory-mapped token files releases the GIL, so the read overlaps the step.
"""
from __future__ import annotations

import queue
import threading


class Prefetcher:
    def __init__(self, fetch, count: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fetch, count), name="sparselm-prefetch", daemon=True)
        self._thread.start()

    def _run(self, fetch, count: int) -> None:
        for _ in range(count):
            try:
                item = (True, fetch())
            except BaseException as err:  # handed to the consumer, which raises it in order
                item = (False, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or not item[0]:
                return

    def next(self):
        ok, value = self._queue.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
