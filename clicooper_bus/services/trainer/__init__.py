"""A trainer: trains one stage of the split model for the owner.

- `__main__`: the process entry point (`python -m clicooper_bus.services.trainer ...`);
- `stage`: joining on the owner's signed roster, and the receive loop's handler table.
"""
