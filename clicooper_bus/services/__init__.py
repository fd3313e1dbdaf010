"""One module per process (broker, notary, owner, trainer): argument parsing, wiring and each
process's event loop. Logic stays in `clicooper_bus`.
"""

import os

# Idle OpenMP threads spin by default and take cores from the other processes of a run; with
# six processes on two cores, passive waiting made an epoch about 8 % faster (measured with
# tools/bench_bus.py). A pipelined owner (`in_flight` > 1) takes OpenMP's default back, and the
# auditor spins (see each). Set OMP_WAIT_POLICY yourself to override. It must be set before
# torch is imported, hence here.
# The default is marked, so that a process started by one that imported this (a test process,
# say) does not take the inherited default for a user's choice.
_MARK = "CLICOOPER_OMP_DEFAULT"
USER_OMP_POLICY = "OMP_WAIT_POLICY" in os.environ and \
    os.environ["OMP_WAIT_POLICY"] != os.environ.get(_MARK)  # else each process decides
if not USER_OMP_POLICY:
    os.environ["OMP_WAIT_POLICY"] = os.environ[_MARK] = "PASSIVE"
