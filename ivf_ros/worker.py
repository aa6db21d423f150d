"""The node's processing thread: the newest pair wins, so no backlog builds up when inference is slower than the
cameras; stopping waits a bounded time for a pair in progress and says whether the thread is gone."""
from __future__ import annotations

import threading


class LatestWorker:
    """Run ``process(item)`` on one thread for the newest ``put`` item; older waiting items are replaced."""

    def __init__(self, process, on_error, name: str = "fusion_worker"):
        self._process, self._on_error = process, on_error
        self._wake = threading.Condition()
        self._pending = None
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """False once ``stop`` was called: a pair still in progress must not publish."""
        return self._running

    def put(self, item) -> bool:
        """Queue ``item``; True when it replaced one that was still waiting (a skipped pair)."""
        with self._wake:
            replaced = self._pending is not None
            self._pending = item
            self._wake.notify()
        return replaced

    def stop(self, timeout: float) -> bool:
        """Drop what waits, wait up to ``timeout`` s for the item in progress; True when the thread has ended."""
        with self._wake:
            self._running = False
            self._pending = None
            self._wake.notify_all()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._running and self._pending is None:
                    self._wake.wait()
                if not self._running:
                    return
                item, self._pending = self._pending, None
            try:
                self._process(item)
            except Exception as exc:  # noqa: BLE001 - one bad pair must not stop the node
                self._on_error(exc)
