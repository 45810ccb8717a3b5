"""Train a model with (or without) KURE.

  python train.py --config configs/cifar10_resnet20.py --workdir runs/r20 [--config.x=y ...]

All logic lives in `kure_jax.training.train.train_and_evaluate(config, workdir)`; a run resumes
from the newest checkpoint in --workdir (default: runs/<config file name>). Multi-host:
call this on every host with JAX_COORDINATOR_ADDRESS etc. set (or pass --distributed)
so that `jax.distributed.initialize()` connects the hosts before anything else.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard files go "
                    "(default: runs/<config file name>, e.g. runs/resnet18).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; pass -v 0 to see them
    logging.set_verbosity(logging.WARNING)
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize()
  from kure_jax.checkpoint import quiet_orbax_logs
  from kure_jax.errors import UserError
  from kure_jax.training.train import train_and_evaluate

  if not FLAGS["verbosity"].present:  # every checkpoint failure is reported below, in one line
    quiet_orbax_logs()

  workdir = FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0])
  try:
    result = train_and_evaluate(FLAGS.config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()})
  return 0


if __name__ == "__main__":
  app.run(main)
