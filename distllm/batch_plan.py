"""How one optimizer step's global batch is cut into micro-batches: computed once, used everywhere.

One optimizer step consumes ``global_batch`` sequences. Each of the ``world_size`` processes runs
``accum`` forward/backward passes of ``micro_batch`` sequences::

    global_batch = micro_batch x accum x world_size

The loader (which samples each rank reads), the runtime (when gradients are synced) and DeepSpeed's
config (``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``) all take this one
``BatchPlan`` rather than recomputing it.

``train.micro_batch_size`` may be left unset (null): the plan then takes the largest micro-batch of
at most ``MICRO_BATCH_CAP`` sequences that divides the per-process share of the global batch, so the
same run file works on 1, 2 or 4 processes (``describe()`` says what was chosen). A micro-batch the
user set is kept exactly, and one that does not fit is an error naming both fixes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distllm.errors import ConfigError

MICRO_BATCH_CAP = 16
"""Largest derived micro-batch (sequences per process per forward pass) when none is set."""


def launcher_world_size() -> int:
    """Processes in the job, from the launcher's environment (torchrun, accelerate launch, our Slurm
    script); 1 when started directly. The one place that reads it before a process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    """Sequences per optimizer step over all processes."""
    micro_batch: int
    """Sequences per forward/backward pass on one process."""
    world_size: int = 1
    derived: bool = False
    """The micro-batch was chosen by the plan (train.micro_batch_size unset)."""

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step on each process."""
        return self.global_batch // (self.micro_batch * self.world_size)

    @classmethod
    def build(cls, global_batch: int, micro_batch: int | None, world_size: int = 1) -> "BatchPlan":
        """The plan for this many processes; ConfigError when the numbers do not fit together."""
        problems = plan_problems(global_batch, micro_batch, world_size)
        if problems:
            raise ConfigError(problems[0])
        if micro_batch is None:
            per_rank = global_batch // world_size
            micro = max(d for d in range(1, min(per_rank, MICRO_BATCH_CAP) + 1) if per_rank % d == 0)
            return cls(global_batch, micro, world_size, derived=True)
        return cls(global_batch, micro_batch, world_size)

    def positions(self, micro_step: int, rank: int) -> slice:
        """Positions in the global batch read by ``rank`` in micro-step ``micro_step``: micro-step m of
        rank r takes ``[m*w*B + r*B, +B)``, so 1 process x accum 2 and 2 processes x accum 1 see the
        same samples in the same steps."""
        start = (micro_step * self.world_size + rank) * self.micro_batch
        return slice(start, start + self.micro_batch)

    def describe(self) -> str:
        text = f"global batch {self.global_batch} = micro {self.micro_batch} x accum {self.accum} x {self.world_size}"
        if self.derived:
            text += " (micro-batch derived for this number of processes; set train.micro_batch_size to fix it)"
        return text


def plan_problems(global_batch: int, micro_batch: int | None, world_size: int) -> list[str]:
    """Every reason the batch sizes cannot be planned on ``world_size`` processes (empty: they can)."""
    if global_batch <= 0 or (micro_batch is not None and micro_batch <= 0):
        return []  # reported by the config's positivity checks
    if micro_batch is None:
        if global_batch % world_size:
            return [f"train.global_batch_size ({global_batch}) must be divisible by the number of processes "
                    f"({world_size})"]
        return []
    per_step = micro_batch * world_size
    if global_batch % per_step:
        return [f"train.global_batch_size ({global_batch}) must be divisible by train.micro_batch_size x processes "
                f"({micro_batch} x {world_size} = {per_step}); change one, or leave train.micro_batch_size unset "
                "(null) to derive it"]
    return []


def validation_micro_batch(global_batch: int, micro_batch: int | None) -> int:
    """Micro-batch of the validation set: ``train.micro_batch_size``, else the cap (at most the global batch).
    Not the derived training micro-batch, so the validation set is the same for any number of processes."""
    return micro_batch if micro_batch is not None else min(global_batch, MICRO_BATCH_CAP)
