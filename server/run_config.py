"""The ServerApp's run-config keys read once: where the run directory is, and whether to resume."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context

from fopro_kd.federation.wire import RUN_CONFIG_OUT_DIR_KEY, RUN_CONFIG_RESUME_DIR_KEY
from fopro_kd.config import Config, ConfigError
from fopro_kd.run_dir import default_run_dir

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["run_dirs_from_run_config"]


def _absolute_dir(key: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise ConfigError(
            f"run config '{key}' must be an absolute path (the app runs from an installed copy), got {raw!r}"
        )
    return path.resolve()


def _out_dir_from_run_config(cfg: Config, context: Context) -> Path:
    raw = str(context.run_config.get(RUN_CONFIG_OUT_DIR_KEY, "") or "")
    if not raw:
        return default_run_dir(cfg, "federated").resolve()
    return _absolute_dir(RUN_CONFIG_OUT_DIR_KEY, raw)


def run_dirs_from_run_config(cfg: Config, context: Context) -> tuple[Path, bool]:
    """``(run directory, resume?)`` from the run config keys ``out-dir`` and ``resume-dir``."""
    resume_raw = str(context.run_config.get(RUN_CONFIG_RESUME_DIR_KEY, "") or "")
    if not resume_raw:
        return _out_dir_from_run_config(cfg, context), False
    resume_dir = _absolute_dir(RUN_CONFIG_RESUME_DIR_KEY, resume_raw)
    out_raw = str(context.run_config.get(RUN_CONFIG_OUT_DIR_KEY, "") or "")
    if out_raw and _absolute_dir(RUN_CONFIG_OUT_DIR_KEY, out_raw) != resume_dir:
        raise ConfigError(
            f"run config '{RUN_CONFIG_RESUME_DIR_KEY}' ({resume_dir}) continues that run directory; "
            f"'{RUN_CONFIG_OUT_DIR_KEY}' ({out_raw}) must be empty or the same path"
        )
    return resume_dir, True
