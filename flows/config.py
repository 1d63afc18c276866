"""Load a drift config: YAML file + ``key=value`` overrides -> validated ``DriftConfig``.

Validation happens before any compute, and errors name the offending key and file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from drift_core.errors import UserError
from drift_core.schemas import DriftConfig, apply_overrides


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the file and the keys."""


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, raw: dict[str, Any] | None = None
) -> DriftConfig:
    source = "<parameters>"
    if raw is None:
        if path is None:
            raw = {}
        else:
            file = Path(path)
            source = str(file)
            if not file.exists():
                raise ConfigError(f"config file {file} does not exist")
            try:
                raw = yaml.safe_load(file.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {file} is not valid YAML: {exc}") from exc
            if not isinstance(raw, dict):
                raise ConfigError(
                    f"config file {file}: expected a mapping of sections, got {type(raw).__name__}"
                )
    try:
        raw = apply_overrides(raw, overrides or [])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        return DriftConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if not key:  # a check across sections: its message names the keys; the input is the whole config
                problems.append(str(err["msg"]).removeprefix("Value error, "))
            elif err["type"] == "extra_forbidden":
                problems.append(f"unknown key {key!r}")
            else:
                problems.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid config {source}: " + "; ".join(problems)) from None
