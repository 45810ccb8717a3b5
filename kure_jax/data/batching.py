"""What every dataset of `kure_jax.data.make_dataset` shares: reading its config section, and the global batch
size's contract with the hosts (each loads batch_size / process_count rows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def config_value(config: Any, key: str, default: Any = None) -> Any:
  """config[key] for a dict, a ConfigDict or any object with attributes; `default` when absent."""
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(key, default)
  getter = getattr(config, "get", None)
  if callable(getter):
    return getter(key, default)
  return getattr(config, key, default)


def check_batching(batch_size: Any, start_step: int, process_index: int | None,
                   process_count: int | None) -> tuple[int, int]:
  """(process_index, process_count), JAX's where None, after checking the global batch size and the start
  step against them (ValueError in one line): what every dataset of `make_dataset` needs."""
  if process_count is None or process_index is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
  if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in 0..{process_count - 1}.")
  if batch_size % process_count:
    raise ValueError(f"the global batch_size {batch_size} is not divisible by the number of processes "
                     f"(jax.process_count() = {process_count}); use a multiple of {process_count} "
                     f"(each host loads batch_size / process_count examples).")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  return int(process_index), int(process_count)
