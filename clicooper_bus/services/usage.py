"""What a process measures of its own compute, for its `usage` message (`protocol.Usage`).

The clock is `time.process_time()`: the CPU time (user + system) of every thread of this process,
as the kernel accounts it (CLOCK_PROCESS_CPUTIME_ID on Linux, nanosecond resolution; the same
total `getrusage(RUSAGE_SELF)` gives, whose user/system split is sampled at the scheduler's
tick). It counts ZeroMQ's I/O threads and torch's intra-op threads, and no child process (none
of ours has any). Unlike `resource`, it exists on every platform a trainer may run on.

A step's window opens when the process starts its part of a training step and closes when its
part is done; the training window runs from the first step's opening to the last one's close.

A trainer started again after a crash carries on the dead process's figures as of its last
snapshot (`carry`; kept in each snapshot file), so its report covers both processes; what the
dead one spent after that snapshot is lost with it and not counted.
"""

from __future__ import annotations

import time

from clicooper_bus.protocol import Usage


class CpuMeter:
    """This process's CPU seconds, in total and over its training window, and its steps."""

    def __init__(self) -> None:
        self.first: tuple[float, float] | None = None  # (cpu_s, wall_s) at the first step's start
        self.last: tuple[float, float] | None = None  # (cpu_s, wall_s) at the last step's end
        self.steps = 0
        self.carried = (0.0, 0.0, 0.0)  # an earlier process's cpu_s, train_cpu_s, train_wall_s

    def carry(self, earlier: Usage) -> None:
        """Add an earlier process's figures (a trainer started again after a crash) to ours."""
        self.carried = (earlier.cpu_s, earlier.train_cpu_s, earlier.train_wall_s)

    def step_started(self) -> None:
        """The process starts its part of a training step (only the first one matters)."""
        if self.first is None:
            self.first = (time.process_time(), time.perf_counter())

    def step_done(self, *, count: bool = True) -> None:
        """The process finished its part of a training step (`count`: False where it does some
        work of a step it counts elsewhere: the window still ends here)."""
        self.step_started()  # a step that is done was started
        self.steps += count
        self.last = (time.process_time(), time.perf_counter())

    def usage(self) -> Usage:
        """What to report: CPU seconds until now, and over the training window."""
        cpu, train, wall = self.carried
        cpu_s = time.process_time() + cpu
        if self.first is None or self.last is None:
            return Usage(cpu_s, train, wall, self.steps if any(self.carried) else 0)
        return Usage(cpu_s, self.last[0] - self.first[0] + train,
                     self.last[1] - self.first[1] + wall, self.steps)
