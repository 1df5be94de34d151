"""JAX's persistent compilation cache for every ``trainer`` command: the second start compiles nothing it compiled before.

Where (first that is set): ``--compilation-cache DIR`` (or ``off``), ``TRAINER_COMPILATION_CACHE`` (same values), JAX's
own ``JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/tilesmith/jax`` (``~/.cache/tilesmith/jax``). Every program
is cached, whatever its compile time or size (JAX's defaults skip programs compiling in under 1 s: on a CPU that is
most of them, and together they cost seconds at every start), and on GPU XLA's per-fusion autotuning results go in
the same directory, so the second start skips autotuning too. A directory that cannot be created is a warning, not
an error: the command compiles as if the cache were off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

ENV = "TRAINER_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false", "no")
_counts = {"hits": 0, "writes": 0}


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tilesmith" / "jax"


def resolve(flag: str | None) -> Path | None:
    """The cache directory the flag and environment select, ``None`` when the cache is off."""
    for name, value in (("--compilation-cache", flag), (ENV, os.environ.get(ENV))):
        if value is None:
            continue
        if not value.strip():
            raise ConfigError(f"{name}: expected a directory or 'off', got an empty value")
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return default_dir()


def enable(flag: str | None = None) -> Path | None:
    """Point JAX at the cache directory (see the module docstring); the directory, or ``None`` when off."""
    import jax
    from jax import monitoring

    directory = resolve(flag)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compilation cache off: cannot create %s (%s)", directory, exc)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if hasattr(jax.config, "jax_persistent_cache_enable_xla_caches"):
        jax.config.update("jax_persistent_cache_enable_xla_caches", "xla_gpu_per_fusion_autotune_cache_dir")
    monitoring.register_event_listener(_count)
    return directory


def _count(event: str, **_: object) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _counts["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":  # recorded when a compiled program is written
        _counts["writes"] += 1


def log_summary() -> None:
    """One log line: programs loaded from the cache and programs compiled and written to it by this process."""
    log.info("compilation cache: %d programs loaded, %d compiled and written", _counts["hits"], _counts["writes"])
