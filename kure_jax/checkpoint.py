"""Checkpoints with orbax: save every N steps, keep the last K, resume, `init_from`.

A checkpoint holds the whole train state (params, batch statistics, optimizer state,
step) plus JSON metadata (model, number of classes, the shape of every parameter, and
a SHA-256 of the state). Resuming checks the metadata against the current config first,
so a workdir holding another model's checkpoint stops the run with one clear message
and is left untouched.

Integrity. `Checkpointer.save` refuses a state holding a non-finite value and writes
``meta["checksum"]``: a SHA-256 over the host bytes of every leaf (its path, dtype and
shape, then its bytes; leaves in sorted path order, so orbax's dicts and optax's named
tuples hash alike). Every restore (`Checkpointer.restore`, `load_variables`) recomputes
it from what was read and refuses a checkpoint whose hash differs, that holds a
non-finite value, or whose state is at another step than its folder says; the
refusal names the newest older checkpoint that passes the same checks. Checkpoints
written before checksums existed are checked for finiteness only.

A save that fails (a full disk) leaves the previous checkpoints as they were: orbax
writes into a temporary folder and renames it only once complete; the failure stops
the run with one line at the next save or at `close`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kure_jax import weights
from kure_jax.core.kurtosis import path_str
from kure_jax.errors import UserError

CHECKSUM = "checksum"  # metadata key: {"sha256": hex digest, "leaves": number of leaves}
DISCARDED = "checkpoints_discarded"  # where resume_step moves the checkpoints newer than it


def param_shapes(params: Any) -> dict[str, list[int]]:
  """{path: shape} of a params tree: what identifies an architecture in metadata."""
  return {path_str(p): list(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _compare(saved: dict[str, list[int]], current: dict[str, list[int]]) -> str | None:
  for k in sorted(set(saved) | set(current)):
    if saved.get(k) != current.get(k):
      return f"{k}: checkpoint {saved.get(k, 'absent')} vs model {current.get(k, 'absent')}"
  return None


# ----------------------------------------------------------------------------------
# Checksums and finiteness.


def _key(k: Any) -> str:
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey (named tuples)
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def host_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
  """(path, host array) for every leaf of `tree`, sorted by path ('opt_state/1/0/trace/conv1/kernel')."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  host = jax.device_get([x for _, x in flat])
  return sorted((("/".join(_key(k) for k in p), np.asarray(x)) for (p, _), x in zip(flat, host)),
                key=lambda item: item[0])


def checksum(leaves: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
  """SHA-256 over (path, dtype, shape, bytes) of `host_leaves`' output, in its order."""
  h = hashlib.sha256()
  for path, x in leaves:
    h.update(f"{path}\0{x.dtype.name}\0{x.shape}\0".encode())
    h.update(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
  return {"sha256": h.hexdigest(), "leaves": len(leaves)}


def nonfinite_leaf(leaves: list[tuple[str, np.ndarray]]) -> str | None:
  """The path of the first floating leaf holding a NaN or an infinity, or None."""
  for path, x in leaves:
    if jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(x).all():
      return path
  return None


def _problem(leaves: list[tuple[str, np.ndarray]], meta: dict[str, Any], step: int) -> str | None:
  """Why a restored state must not be used (None: it is intact)."""
  bad = nonfinite_leaf(leaves)
  if bad is not None:
    return f"{bad} holds non-finite values"
  saved = meta.get(CHECKSUM)
  if saved is not None and checksum(leaves) != saved:
    return "its SHA-256 differs from the one written at save time: the files changed after saving"
  leaf_step = dict(leaves).get("step")
  if leaf_step is not None and leaf_step.shape == () and int(leaf_step) != step:
    return f"its state is at step {int(leaf_step)}, not {step}"
  return None


def _reason(e: BaseException) -> str:
  """One short phrase for an orbax/tensorstore/OS error: its innermost cause's first line."""
  chain: list[BaseException] = []
  while e is not None and e not in chain and len(chain) < 20:
    chain.append(e)
    e = e.__cause__ or e.__context__
  text = " ".join(str(x) for x in chain)
  if any(getattr(x, "errno", None) == errno.ENOSPC for x in chain) or "No space left on device" in text:
    return "no space left on device"
  inner = chain[-1]
  lines = str(inner).strip().splitlines()
  return f"{type(inner).__name__}: {lines[0][:200]}" if lines else type(inner).__name__


class _Damaged(Exception):
  """A checkpoint that cannot be used; the message says why."""


def _restore_checked(mngr: ocp.CheckpointManager, step: int, abstract: Any = None,
                     check: Callable[[dict], None] | None = None) -> tuple[Any, dict[str, Any]]:
  """Read and verify one step (into `abstract`'s structure and shardings, or as saved onto this process's first
  device)."""
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
    raise _Damaged(_reason(e)) from e
  if check is not None:
    check(meta)  # a checkpoint of another model is not damage: its UserError passes through
  try:
    if abstract is None:  # as saved, but onto this process's first device: the saving run's devices may be others
      abstract = _on_first_device(os.path.join(str(mngr.directory), str(step), "state"))
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:  # noqa: BLE001
    raise _Damaged(_reason(e)) from e
  problem = _problem(host_leaves(state), meta, step)
  if problem:
    raise _Damaged(problem)
  return state, meta


def _on_first_device(state_dir: str) -> Any:
  """The saved state's structure, shapes and dtypes, placed on this process's first device.

  A checkpoint keeps the shardings of the run that wrote it (e.g. two CPU devices with config.cpu_devices=2);
  restoring it as saved fails where those devices do not exist (eval.py, init_from, an export on one device).
  """
  meta = ocp.StandardCheckpointer().metadata(state_dir)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                      if hasattr(m, "shape") and hasattr(m, "dtype") else m, tree)


def _newest_intact(mngr: ocp.CheckpointManager, below: int, abstract: Any = None) -> int | None:
  for step in sorted((s for s in mngr.all_steps() if s < below), reverse=True):
    try:
      _restore_checked(mngr, step, abstract)
      return step
    except _Damaged:
      continue
  return None


def _damaged(directory: str, step: int, reason: str, intact: int | None, use: Callable[[int], str]) -> str:
  head = f"the checkpoint at {directory} (step {step}) is damaged and cannot be read ({reason}); it was left untouched."
  if intact is None:
    return head + " No older checkpoint there is intact: move it away or pick another --workdir."
  return head + f" The newest intact checkpoint is step {intact}: {use(intact)}."


# ----------------------------------------------------------------------------------
# Saving and resuming a run.


class Checkpointer:
  """``ocp.CheckpointManager`` under ``<workdir>/checkpoints`` with checksums; a context manager that closes it."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    self._pending: int | None = None  # a save still being written in the background
    self._saved = self.manager.latest_step()  # the newest checkpoint known to be complete
    self._closed = False
    self._abstract = None  # the structure and shardings of the last restore's target

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()

  def abort(self) -> None:
    """`close` on an error path: a failure of its own would only hide the error being reported."""
    try:
      self.close()
    except Exception:  # noqa: BLE001
      pass

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Save `state` as `step` (in the background); UserError if it is not finite or a save failed."""
    self._finish()
    leaves = host_leaves(state)
    bad = nonfinite_leaf(leaves)
    if bad is not None:
      raise UserError(f"refusing to save the checkpoint of step {step}: {bad} holds non-finite values. "
                      f"The checkpoints in {self.directory} were left as they were.")
    meta = {**meta, CHECKSUM: checksum(leaves)}
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # noqa: BLE001 - a full disk, a read-only folder, ...
      raise UserError(self._save_failed(step, e)) from e
    self._pending = step

  def _finish(self) -> None:
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise UserError(self._save_failed(step, e)) from e
    self._saved = step

  def _save_failed(self, step: int, e: BaseException) -> str:
    then = (f"the previous checkpoint (step {self._saved}) is intact: rerun the same command to resume from it"
            if self._saved is not None else "no earlier checkpoint exists: a rerun starts over")
    return (f"saving the checkpoint of step {step} to {self.directory} failed ({_reason(e)}); the run stopped, "
            f"and {then} once that is fixed.")

  def wait(self) -> None:
    self._finish()

  def close(self) -> None:
    """Wait for a background save (UserError if it failed) and release orbax's threads."""
    if self._closed:
      return
    self._closed = True
    error = None
    try:
      self._finish()
    except UserError as e:
      error = e
    try:
      self.manager.close()
    except Exception as e:  # noqa: BLE001
      error = error or UserError(f"closing the checkpoints in {self.directory} failed ({_reason(e)}).")
    if error is not None:
      raise error

  def read_meta(self, step: int) -> dict[str, Any]:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
      raise UserError(self._damaged(step, _reason(e))) from e

  def restore(self, target: Any, expected_meta: dict[str, Any], step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore `step` (default: the newest) into the structure and shardings of `target`, verified.

    The metadata must fit `expected_meta` (model, classes, parameter shapes, and the QAT
    setting under "quant"); a damaged checkpoint is refused, naming the newest intact one.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise UserError(f"no checkpoint found in {self.directory}.")
      step = steps[-1]
    elif step not in steps:
      held = f"holds steps {', '.join(map(str, steps))}" if steps else "holds no checkpoint"
      raise UserError(f"config.resume_step is {step}, but {self.directory} {held}.")

    def check(meta):
      check_meta(meta, expected_meta, self.workdir)
      if meta.get("quant") != expected_meta.get("quant"):
        raise UserError(f"{self.workdir} holds a checkpoint trained with quant={meta.get('quant')}, but the config "
                        f"asks for quant={expected_meta.get('quant')}. It was left untouched: pick another --workdir "
                        "(or fix the config).")

    abstract = self._abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      state, meta = _restore_checked(self.manager, step, abstract, check)
    except _Damaged as e:
      raise UserError(self._damaged(step, str(e), abstract)) from e
    return state, meta

  def _damaged(self, step: int, reason: str, abstract: Any = None) -> str:
    intact = _newest_intact(self.manager, step, abstract)
    return _damaged(self.directory, step, reason, intact, lambda k: (
        f"resume from it with --config.resume_step={k} (the damaged ones after it are then moved to "
        f"{os.path.join(self.workdir, DISCARDED)})"))

  def discard_after(self, step: int) -> list[int]:
    """Move the damaged checkpoints newer than `step` to ``<workdir>/checkpoints_discarded``; returns their steps.

    For ``config.resume_step``: a newer checkpoint that is intact stops it (UserError), so a
    command rerun with the flag after more progress does not silently go back.
    """
    newer = [s for s in self.all_steps() if s > step]
    for s in newer:
      try:
        _restore_checked(self.manager, s, self._abstract)
      except _Damaged:
        continue
      raise UserError(f"config.resume_step is {step}, but the newer checkpoint of step {s} is intact: drop "
                      f"--config.resume_step to resume from the newest (to go back to step {step} on purpose, move "
                      f"the checkpoints after it out of {self.directory} first).")
    if newer and jax.process_index() == 0:
      root = os.path.join(self.workdir, DISCARDED)
      os.makedirs(root, exist_ok=True)
      for s in newer:
        dest, n = os.path.join(root, str(s)), 1
        while os.path.exists(dest):
          dest, n = os.path.join(root, f"{s}.{n}"), n + 1
        os.rename(os.path.join(self.directory, str(s)), dest)
    if newer:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices("kure_jax.checkpoint.discard_after")
      self.manager.reload()
      self._saved = step
    return newer


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
  """Read {'params', 'batch_stats'} (+ 'qsteps' of an LSQ run) and the metadata of a checkpoint, verified.

  `path` is a workdir or its 'checkpoints' folder (the newest step), one step's folder in it
  ('runs/r20/checkpoints/4'), or a shipped-weights folder ('weights/<name>', `kure_jax.weights`).
  Used by `init_from` and eval.
  """
  if weights.is_weights(path):  # a folder holding variables.msgpack: shipped weights, verified by their SHA-256
    return weights.load(path)
  directory, step = os.path.normpath(path), None
  if os.path.basename(directory).isdigit() and os.path.basename(os.path.dirname(directory)) == "checkpoints":
    directory, step = os.path.dirname(directory), int(os.path.basename(directory))
  elif os.path.basename(directory) != "checkpoints":
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"no checkpoint found at {path} (expected a workdir written by train.py, with a 'checkpoints' "
                    "folder, or a shipped-weights folder such as weights/<name>).")
  directory = os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  mngr = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
  try:
    steps = sorted(mngr.all_steps())
    if step is None and steps:
      step = steps[-1]
    if step is None or step not in steps:
      raise UserError(f"no checkpoint found at {path}.")
    try:
      state, meta = _restore_checked(mngr, step)
    except _Damaged as e:
      intact = _newest_intact(mngr, step)
      raise UserError(_damaged(directory, step, str(e), intact,
                               lambda k: f"use {os.path.join(directory, str(k))} in its place")) from e
  finally:
    mngr.close()
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  if state.get("qsteps"):  # LSQ's learned steps
    variables["qsteps"] = state["qsteps"]
  return variables, meta


# ----------------------------------------------------------------------------------
# Command-line quiet.


def quiet_orbax_logs() -> None:
  """Hide orbax's own log records, and the asyncio debris of a failed orbax read or write (idempotent).

  For train.py and eval.py (unless -v is given): every orbax failure reaches them as an exception,
  reported as one line. Orbax also logs it at ERROR from its background threads, and a failed
  restore or save leaves the sibling reads/writes it gathered un-awaited in an event loop it has
  closed; asyncio reports those ("Task exception was never retrieved", "Event loop is closed",
  "Exception ignored in <coroutine>", "coroutine ... was never awaited") whenever they are
  garbage-collected, often at exit. A future that tensorstore completed with the error carries no orbax frame, so any un-retrieved future or
  task is dropped: the command-line tools run no event loop of their own, only orbax does.
  """
  global _quiet
  if _quiet:
    return
  _quiet = True
  logging.getLogger("absl").addFilter(lambda r: f"{os.sep}orbax{os.sep}" not in (r.pathname or ""))
  # A read coroutine that the failed restore never awaited warns when it is collected; the warning is
  # attributed to whatever line runs the collection, so it can only be recognized by its words.
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
  for name in ("asyncio", "concurrent.futures"):
    logging.getLogger(name).addFilter(lambda r: not (_UNRETRIEVED in _message(r) or _orbax_debris(
        r.exc_info[1] if r.exc_info else None, _message(r))))
  previous = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None) or getattr(getattr(unraisable.object, "get_coro",
                                                                         lambda: None)(), "cr_code", None)
    where = getattr(code, "co_filename", "") or ""
    if f"{os.sep}orbax{os.sep}" in where or _orbax_debris(unraisable.exc_value, ""):
      return
    previous(unraisable)

  sys.unraisablehook = hook


_quiet = False
_UNRETRIEVED = "exception was never retrieved"  # asyncio's words for a Future's or a Task's


def _message(record: logging.LogRecord) -> str:
  try:
    return record.getMessage()
  except Exception:  # noqa: BLE001
    return str(record.msg)


def _orbax_debris(exc: BaseException | None, message: str) -> bool:
  """Whether a log record or unraisable exception comes from orbax/tensorstore leftovers."""
  if f"{os.sep}orbax{os.sep}" in message or "Event loop is closed" in message:
    return True
  seen = 0
  while exc is not None and seen < 20:
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
      return True
    tb = exc.__traceback__
    while tb is not None:
      if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    exc, seen = exc.__cause__ or exc.__context__, seen + 1
  return False
