"""One module per process (broker, owner, trainer, notary, auditor): argument parsing, wiring
and each process's event loop. Logic stays in `clicooper_bus`.

None exists yet: the processes arrive with the training-run issue (the bus). Until then the
offline tools in `tools/` are the way in.
"""
