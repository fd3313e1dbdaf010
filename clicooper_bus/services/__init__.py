"""One module or package per process (broker, notary, owner, trainer, auditor): argument
parsing, wiring and each process's event loop. Logic stays in the library; the receive loop
they share is `dispatch`, what every process does at start and stop is `common`.
"""
