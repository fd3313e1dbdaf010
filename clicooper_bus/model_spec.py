"""Model spec files: the built-in zoo (`clicooper_bus/ml/zoo/NAME.toml`) and a user's own,
read and checked for structure without torch; `clicooper_bus.ml.models.resolve_spec` checks
their layers against a dataset's shape. `[model]` in a run config names one or inlines it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clicooper_bus.errors import ConfigError

if TYPE_CHECKING:
    from clicooper_bus.config import ModelSection

__all__ = ["SPEC_KEYS", "ZOO", "builtin_models", "inline_spec", "read_spec_file"]

ZOO = Path(__file__).parent / "ml" / "zoo"  # the built-in model specs, one NAME.toml each
SPEC_KEYS = ("name", "description", "default_cut", "layers")  # what a spec file may hold


def builtin_models() -> list[str]:
    """The names of the built-in model specs (`clicooper_bus/ml/zoo/NAME.toml`)."""
    return sorted(p.stem for p in ZOO.glob("*.toml"))


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A model spec file as data: `name` (str), `default_cut` (int, 0: none given),
    `description` (str) and `layers` (a list of tables with `op`). Only the file's structure
    is checked here (torch-free); the layers are checked against a dataset's shape by
    `clicooper_bus.ml.models.resolve_spec`. Raises ConfigError naming the file."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"model spec file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"model spec file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"model spec file {path}: unknown key(s) {', '.join(unknown)}; a spec "
                          f"holds {', '.join(SPEC_KEYS)}")
    spec = {"name": doc.get("name", Path(path).stem), "description": doc.get("description", ""),
            "default_cut": doc.get("default_cut", 0), "layers": doc.get("layers")}
    if not isinstance(spec["name"], str) or not isinstance(spec["description"], str):
        raise ConfigError(f"model spec file {path}: name and description must be strings")
    if type(spec["default_cut"]) is not int or spec["default_cut"] < 0:
        raise ConfigError(f"model spec file {path}: default_cut must be a layer index (an "
                          f"integer >= 1), got {spec['default_cut']!r}")
    if not isinstance(spec["layers"], list) or not spec["layers"]:
        raise ConfigError(f"model spec file {path}: needs a non-empty list of layers, e.g. "
                          f"[[layers]] tables with op = \"conv2d\", out = 16, kernel = 3")
    return spec


def inline_spec(m: ModelSection, name: str, spec_dir: Path, named: bool) -> None:
    """Inline a spec file's layers into the section (so the run's config.toml is whole) and
    check the section's structure; the layers themselves are checked against the data by
    `clicooper_bus.ml.models.resolve_spec` (`clicooper run` and `clicooper plan` do, before
    anything starts)."""
    where = f"{name}: [model]"
    if m.spec and m.layers:
        raise ConfigError(f"{where} gives both spec (a file) and layers (inline): keep one")
    if m.spec:
        path = Path(m.spec) if Path(m.spec).is_absolute() else spec_dir / m.spec
        try:
            doc = read_spec_file(path)
        except ConfigError as exc:
            raise ConfigError(f"{where} spec: {exc}") from None
        m.layers, m.spec = doc["layers"], ""
        m.default_cut = m.default_cut or doc["default_cut"]
        m.name = m.name if named else doc["name"]
    elif m.layers:
        m.name = m.name if named else "custom"
    elif m.name not in builtin_models():
        raise ConfigError(f"{where} name: {m.name!r} is not a built-in model "
                          f"({', '.join(builtin_models())}); for your own, give `spec` (a file) "
                          f"or `layers`")
    bad = next((i for i, layer in enumerate(m.layers) if not isinstance(layer, dict)), None)
    if bad is not None:
        raise ConfigError(f"{where} layers: layer {bad} must be a table with op = ..., got "
                          f"{m.layers[bad]!r}")
