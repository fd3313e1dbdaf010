"""The checks of a run config that span keys or sections, run once its keys are read and
typed (`clicooper_bus.config.config_from_text`): each error names the file, the keys and what
to set instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clicooper_bus.errors import ConfigError

if TYPE_CHECKING:
    from clicooper_bus.config import PrivacySection, RunConfig

__all__ = ["cross_checks", "privacy_checks"]


def cross_checks(cfg: RunConfig, name: str) -> None:
    """The checks that span keys or sections of a loaded config (names, the bus's timeouts,
    cuts per trainer, privacy levers that need each other, the log's retention). Raises
    ConfigError naming the file and what to set."""
    from clicooper_bus.net.identity import check_name

    try:
        check_name(cfg.run.id, "run id")
        p = cfg.participants
        names = [p.owner, p.notary, *p.trainers, *p.standby, *p.observers, p.broker]
        for n in names:
            check_name(n, "participant name")
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if not set(p.remote) <= set(p.trainers):
        raise ConfigError(f"{name}: [participants] remote {sorted(set(p.remote) - set(p.trainers))} "
                          f"are not trainers: list them in `trainers` too (their stage order)")
    from clicooper_bus.net.curve import check_security  # raises ConfigError itself

    check_security(cfg.bus.security, *(a for a in (cfg.bus.pub, cfg.bus.sub, cfg.bus.witness) if a))
    if cfg.bus.rejoin_timeout_s < cfg.bus.timeout_s:
        raise ConfigError(f"{name}: [bus] rejoin_timeout_s ({cfg.bus.rejoin_timeout_s:g} s) is "
                          f"shorter than timeout_s ({cfg.bus.timeout_s:g} s): a silent peer is "
                          f"suspected after timeout_s and gone after rejoin_timeout_s; raise "
                          f"rejoin_timeout_s to at least {cfg.bus.timeout_s:g}")
    t = cfg.participants.trainers
    if not 1 <= len(t) <= 8 or len(set(t)) != len(t):
        raise ConfigError(f"{name}: [participants] trainers must name 1 to 8 distinct trainers")
    if "all" in names:
        raise ConfigError(f"{name}: [participants] 'all' is the addressee of broadcast messages, "
                          f"not a participant name: choose another")
    if len(set(names)) != len(names):
        raise ConfigError(f"{name}: [participants] names a key twice: every participant, and "
                          f"the broker, has its own key")
    if any(type(c) is not int for c in cfg.model.cuts):
        raise ConfigError(f"{name}: [model] cuts must be integers")
    if cfg.model.cuts and len(cfg.model.cuts) != len(t):
        raise ConfigError(f"{name}: [model] cuts needs one index per trainer ({len(t)})")
    privacy_checks(cfg.privacy, name)
    from clicooper_bus.tlog.retention import Retention

    try:
        Retention.parse(cfg.log.retention)
    except ConfigError as exc:
        raise ConfigError(f"{name}: [log] retention: {exc}") from None


def privacy_checks(p: PrivacySection, name: str) -> None:
    """[privacy] keys that need or exclude each other. Raises ConfigError saying which to set."""
    where = f"{name}: [privacy]"
    if p.mechanism == "none" and (p.epsilon or p.noise_multiplier):
        raise ConfigError(f"{where} epsilon and noise_multiplier need a mechanism (gaussian or "
                          f"laplace)")
    if p.mechanism != "none" and bool(p.epsilon) == bool(p.noise_multiplier):
        raise ConfigError(f"{where} mechanism {p.mechanism} needs exactly one of epsilon (a "
                          f"target) or noise_multiplier (a noise level)")
    if p.delta >= 1:
        raise ConfigError(f"{where} delta must be below 1, got {p.delta}")
    if p.owner_tail and p.label_gamma > 1:
        raise ConfigError(f"{where} label_gamma has no effect with owner_tail (no label leaves "
                          f"the owner): set label_gamma = 1")
    if p.release == "once" and (p.nopeek or p.label_dcor):
        raise ConfigError(f"{where} nopeek and label_dcor train the head, which release = once "
                          f"keeps fixed")
    if (p.finetune_epochs or p.finetune_samples or p.finetune_control) and not p.owner_tail:
        raise ConfigError(f"{where} the fine-tune trains the owner's head and tail: set "
                          f"owner_tail = true, or finetune_epochs = 0")
    if p.secret_order and p.evaluate != "owner":
        raise ConfigError(f"{where} secret_order hides the training order only: evaluation "
                          f"through the trainers sends the test split in its fixed order, one "
                          f"image's releases linkable across epochs; set evaluate = \"owner\"")
    if 0 < p.label_epsilon < 1e-9:
        raise ConfigError(f"{where} label_epsilon {p.label_epsilon:g} is finer than randomised "
                          f"response resolves: use 0 (off) or 1e-9 or more")
    if (p.finetune_samples or p.finetune_control) and not p.finetune_epochs:
        raise ConfigError(f"{where} finetune_samples and finetune_control need finetune_epochs "
                          f"> 0")
