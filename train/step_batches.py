"""Which micro-batches each optimizer step uses: a data position that does not depend on the layout.

A stage's data is a stream of micro-batches: epoch 0's plan, then epoch 1's, ... (each plan from
`batching.plan_microbatches`: the lengths, the seed and the epoch only, so every rank and every rerun
derive the same one). A step takes the next `per_step` = dp_degree x grad_accum micro-batches of the
current epoch; the few an epoch has left when fewer than `per_step` remain are skipped, and the step
starts the next epoch. Micro-batch j*dp + d of a step is the j-th accumulation micro-batch of DP rank d.

A checkpoint records the position (epoch, next micro-batch) and the step count. Resuming with the same
`per_step` replays exactly: step n uses the same micro-batches. Resuming with another layout (workers,
sp_degree, grad_accum) continues from the same position; only when `per_step` changed do the remaining
steps take a different number of micro-batches each (the global batch changes), and the total step count
becomes steps done + steps left at the new size (`max_steps`, when set, stays the total).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    index: int = 0  # next micro-batch of that epoch's plan


@dataclass(frozen=True)
class OptimizerStep:
    epoch: int
    microbatches: list[list[int]]  # per_step micro-batches (sample indices), in plan order
    after: DataPosition                # the position once this step is done


class StepBatches:
    """Steps from a position. `plan(epoch)` -> that epoch's micro-batches; `epochs` bounds the stream
    unless `max_steps` > 0 (then epochs repeat until max_steps steps in all)."""

    def __init__(self, plan: Callable[[int], list[list[int]]], per_step: int, epochs: int, max_steps: int = 0):
        """Raises ValueError when `per_step` is below 1."""
        if per_step < 1:
            raise ValueError(f"per_step must be >= 1 (got {per_step})")
        self.plan, self.per_step, self.epochs, self.max_steps = plan, per_step, epochs, max_steps

    def _epoch_steps(self, epoch: int, start: int) -> int:
        return max(0, (len(self.plan(epoch)) - start) // self.per_step)

    def steps_left(self, pos: DataPosition, done: int = 0) -> int:
        """Steps still to run from `pos` after `done` steps."""
        if self.max_steps:
            return max(0, self.max_steps - done)
        return sum(self._epoch_steps(e, pos.index if e == pos.epoch else 0) for e in range(pos.epoch, self.epochs))

    def steps(self, pos: DataPosition, done: int = 0) -> Iterator[OptimizerStep]:
        """The remaining steps, in order, starting at `pos`.

        Raises ValueError when an epoch has fewer micro-batches than one step takes.
        """
        left = self.steps_left(pos, done)
        epoch, index = pos.epoch, pos.index
        guard = 0
        while left > 0:
            plan = self.plan(epoch)
            if len(plan) - index < self.per_step:
                epoch, index = epoch + 1, 0
                guard += 1
                if guard > 2 and len(plan) < self.per_step:
                    raise ValueError(f"epoch {epoch - 1} has {len(plan)} micro-batches, fewer than one step's {self.per_step}")
                continue
            guard = 0
            yield OptimizerStep(epoch, plan[index:index + self.per_step], DataPosition(epoch, index + self.per_step))
            index += self.per_step
            left -= 1
