"""A generator run on a worker thread of its own, a few items ahead of its consumer.

The feeds use it to read and decode the next batches while the training thread trains
(``data.decode_ahead``): everything the generator does -- reading the files, DALI's
``run``, the copy of its output into a tensor -- leaves the caller's thread, which only
takes the finished items, in their order.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Generator
from typing import Generic, TypeVar

__all__ = ["Ahead"]

T = TypeVar("T")


class _Failed:
    """The exception that ended the worker's generator, to be raised by the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class Ahead(Generic[T]):
    """The items of ``items``, made on a worker thread, at most ``depth`` finished ahead.

    An exception raised by ``items`` is raised by the consumer's ``next`` at its place in
    the order, the items before it delivered first. :meth:`close` (also on leaving a
    ``with``) stops the worker once the item it is making is done and waits for it; the
    generator is closed on the worker's thread, so what it holds (a DALI pipeline) is
    freed there and nothing outlives ``close``. The thread is a daemon: an ``Ahead``
    never closed cannot keep the interpreter from exiting.
    """

    def __init__(self, items: Generator[T], depth: int, name: str) -> None:
        if depth < 1:
            raise ValueError(f"depth {depth}: a worker needs room for at least one item")
        self._depth = depth
        self._ready: collections.deque = collections.deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, args=(items,), name=name, daemon=True)
        self._thread.start()

    def __iter__(self) -> Ahead[T]:
        return self

    def __next__(self) -> T:
        with self._changed:
            self._changed.wait_for(lambda: self._ready)
            item = self._ready.popleft()
            if item is _END or isinstance(item, _Failed):
                self._ready.appendleft(_END)  # the worker is done: every later next ends
            self._changed.notify_all()
        if item is _END:
            raise StopIteration
        if isinstance(item, _Failed):
            error, item = item.error, None
            try:
                raise error
            finally:
                del error  # no cycle through this frame: what the error's frames hold is freed with it
        return item

    def close(self) -> None:
        """Stop the worker and wait for it (at most the item it is making)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()
        self._ready.clear()
        self._ready.append(_END)  # a next after close ends instead of waiting for a worker that is gone

    def __enter__(self) -> Ahead[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _work(self, items: Generator[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # whatever it is, the consumer's thread raises it
            self._put(_Failed(e))
        else:
            self._put(_END)
        finally:
            items.close()

    def _put(self, item: object) -> bool:
        """Hand ``item`` over once there is room; False when the consumer stopped."""
        with self._changed:
            self._changed.wait_for(lambda: self._stopping or len(self._ready) < self._depth)
            if self._stopping:
                return False
            self._ready.append(item)
            self._changed.notify_all()
            return True
