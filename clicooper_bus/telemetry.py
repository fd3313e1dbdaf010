"""Structured JSON telemetry on stderr, with run id, role and stage bound.

Telemetry is for operators; the provenance log is the evidence. Nothing here is signed.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(role: str, *, run_id: str | None = None, stage: str | None = None,
              level: int = logging.INFO) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog for this process and return a logger with its context bound."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # resolve sys.stderr at each use, so a replaced stream (tests, daemons) is followed
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    context = {"role": role}
    if run_id is not None:
        context["run_id"] = run_id
    if stage is not None:
        context["stage"] = stage
    structlog.contextvars.bind_contextvars(**context)
    return structlog.get_logger("clicooper")
