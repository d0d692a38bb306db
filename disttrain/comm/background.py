"""Work that runs on its own thread while training goes on, and reports its failure when waited for."""

from __future__ import annotations

import threading
from collections.abc import Callable


class InBackground:
    """Runs ``work`` on a thread; wait() joins it and raises what it raised."""

    def __init__(self, work: Callable[[], None], name: str):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as error:  # handed to the waiting thread, which raises it
            self._error = error

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
