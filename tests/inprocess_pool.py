"""An engine pool stand-in that answers in the test's own process, for tests of the request scheduler and of
the clients above it without Ray: `answer(row) -> result` plays the engine (RESULT_COLUMNS)."""

from __future__ import annotations

from typing import Any, Callable


class InProcessPool:
    """The EnginePool interface the scheduler uses; every submitted row is answered at the next poll."""

    def __init__(self, answer: Callable[[dict], dict], slots: int = 4):
        self.answer = answer
        self.slots = slots
        self.pending: list[tuple[dict, Any]] = []
        self.rows: list[dict] = []          # every row sent, in order

    def capacity(self) -> int:
        return self.slots

    def in_flight(self) -> int:
        return len(self.pending)

    def fresh_mark(self) -> int:
        return 0

    def autoscale(self, backlog: int, fresh_from: int | None = None) -> None:
        pass

    def submit(self, row: dict, job: Any, fresh_from: int = 0, alone: bool = False) -> bool:
        if len(self.pending) >= self.slots:
            return False
        self.pending.append((row, job))
        self.rows.append(row)
        return True

    def poll(self, timeout: float):
        done, self.pending = self.pending, []
        return [(job, {**self.answer(row), "duration_s": 0.0}) for row, job in done], []
