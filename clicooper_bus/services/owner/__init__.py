"""The owner: holds the data, the labels and the head; drives the run.

- `__main__`: the process entry point (`python -m clicooper_bus.services.owner --config FILE`);
- `process`: joining and the receive loop's handler table; `run()` reads as the protocol;
- `setup`: what the owner builds from its config (data, split model, defences, plan, roster);
- `books`: what the control traffic tells it (hellos, metrics, checkpoints, watermarks);
- `training`: epochs, the in-flight window, releases through the defences, evaluation;
- `artefacts`: model, label groups, summary and provenance bundle, through `RunLayout`.
"""
