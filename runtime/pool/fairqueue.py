"""A queue that is fair across agents: round-robin over the agents that have work waiting.

An agent that submits a thousand tasks does not delay another agent's next task by a thousand: each
``pop`` serves the agent at the head of the rotation and moves it to the back. Within an agent, order
is first-in first-out (``push_front`` puts a retried task back at the head of its agent's line).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-key FIFO lines served round-robin."""

    def __init__(self) -> None:
        self._lines: OrderedDict[str, deque[T]] = OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[T]:
        for line in self._lines.values():
            yield from line

    def push(self, key: str, item: T) -> None:
        """Append ``item`` to ``key``'s line (a new key joins the back of the rotation)."""
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = deque()
        line.append(item)
        self._len += 1

    def push_front(self, key: str, item: T) -> None:
        """Put ``item`` at the head of ``key``'s line, and ``key`` at the head of the rotation."""
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = deque()
        line.appendleft(item)
        self._lines.move_to_end(key, last=False)
        self._len += 1

    def pop(self) -> tuple[str, T]:
        """Take the next item in fair order; ``IndexError`` when empty."""
        for key, line in self._lines.items():
            item = line.popleft()
            if line:
                self._lines.move_to_end(key)
            else:
                del self._lines[key]
            self._len -= 1
            return key, item
        raise IndexError("pop from an empty FairQueue")

    def peek(self) -> T:
        """The item ``pop`` would take next, left in place; ``IndexError`` when empty."""
        for line in self._lines.values():
            return line[0]
        raise IndexError("peek into an empty FairQueue")

    def remove(self, key: str, item: T) -> bool:
        """Take ``item`` out of ``key``'s line (the rotation is otherwise unchanged); False if not there."""
        line = self._lines.get(key)
        if line is None or item not in line:
            return False
        line.remove(item)
        if not line:
            del self._lines[key]
        self._len -= 1
        return True

    def drain(self) -> list[T]:
        """Remove and return every item."""
        items = list(self)
        self._lines.clear()
        self._len = 0
        return items
