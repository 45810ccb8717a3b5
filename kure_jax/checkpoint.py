"""Checkpoints with orbax: save every N steps, keep the last K, resume, `init_from`.

A checkpoint holds the whole train state (params, batch statistics, optimizer state,
step) plus JSON metadata (model, number of classes, the shape of every parameter).
Resuming checks the metadata against the current config first, so a workdir holding
another model's checkpoint, or an unreadable one, stops the run with one clear
message and is left untouched.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kure_jax.errors import UserError
from kure_jax.kurtosis import path_str


def param_shapes(params: Any) -> dict[str, list[int]]:
  """{path: shape} of a params tree: what identifies an architecture in metadata."""
  return {path_str(p): list(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _compare(saved: dict[str, list[int]], current: dict[str, list[int]]) -> str | None:
  for k in sorted(set(saved) | set(current)):
    if saved.get(k) != current.get(k):
      return f"{k}: checkpoint {saved.get(k, 'absent')} vs model {current.get(k, 'absent')}"
  return None


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def read_meta(self, step: int) -> dict[str, Any]:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
      raise UserError(_unreadable(self.directory, step, e)) from e

  def restore(self, target: Any, expected_meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Restore the latest checkpoint into the structure (and shardings) of `target`."""
    step = self.latest_step()
    meta = self.read_meta(step)
    check_meta(meta, expected_meta, self.directory)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # noqa: BLE001
      raise UserError(_unreadable(self.directory, step, e)) from e
    return restored["state"], meta


def _unreadable(directory: str, step: int | None, e: Exception) -> str:
  first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
  return (f"the checkpoint at {directory} (step {step}) cannot be read ({type(e).__name__}: {first}). "
          "It was left untouched: move it away or pick another --workdir.")


def check_meta(meta: dict[str, Any], expected: dict[str, Any], where: str) -> None:
  """Raise UserError if a checkpoint's metadata does not fit the current config."""
  for key in ("model", "num_classes"):
    if key in expected and meta.get(key) != expected[key]:
      raise UserError(f"{where} holds a checkpoint of {key}={meta.get(key)!r}, but the config asks for "
                      f"{key}={expected[key]!r}. It was left untouched: pick another --workdir (or fix the config).")
  if "param_shapes" in expected and "param_shapes" in meta:
    diff = _compare(meta["param_shapes"], expected["param_shapes"])
    if diff:
      raise UserError(f"{where} holds a checkpoint whose parameters do not fit this model ({diff}). "
                      "It was left untouched: pick another --workdir (or fix the config).")


def load_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Read {'params', 'batch_stats'} (+ 'qsteps' of an LSQ run) and the metadata of the latest checkpoint under `path`.

  `path` may be a workdir or its 'checkpoints' folder. Used by `init_from` and eval.
  """
  directory = path if os.path.basename(os.path.normpath(path)) == "checkpoints" else os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"no checkpoint found at {path} (expected a workdir written by train.py, with a 'checkpoints' folder).")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  mngr = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))
  step = mngr.latest_step()
  if step is None:
    raise UserError(f"no checkpoint found in {directory}.")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001
    raise UserError(_unreadable(directory, step, e)) from e
  state = restored["state"]
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  if state.get("qsteps"):  # LSQ's learned steps
    variables["qsteps"] = state["qsteps"]
  return variables, restored["meta"]
