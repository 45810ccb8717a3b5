"""Score checkpoints across bit-widths × step ratios × rounding policies in one compiled call.

  python eval.py --config configs/cifar10_resnet20.py --checkpoint runs/r20 --checkpoint runs/r20_kure \
      --label baseline --label kure --out runs/robustness [--config.eval.bits="(2,3,4,8)" ...]

The grid is ``config.eval`` (see configs/default.py). Writes robustness.json, robustness.csv
and PNG plots to --out and prints a summary table.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_multi_string("checkpoint", [], "A workdir written by train.py (repeat for several).")
flags.DEFINE_multi_string("label", [], "A label per --checkpoint (default: the workdir's name).")
flags.DEFINE_string("out", "robustness", "Where the JSON, CSV and plots go.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from kure_jax.checkpoint import quiet_orbax_logs
  from kure_jax.errors import UserError
  from kure_jax.evaluation import report
  from kure_jax.evaluation.evaluate import run_eval

  if not FLAGS["verbosity"].present:  # every checkpoint failure is reported below, in one line
    quiet_orbax_logs()

  try:
    rows = run_eval(FLAGS.config, FLAGS.checkpoint, FLAGS.label, FLAGS.out, progress=FLAGS.config.get("progress", True))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.summary_table(rows))
  print(f"\n{len(rows)} rows → {FLAGS.out}/robustness.{{json,csv}}, accuracy_vs_ratio.png, accuracy_vs_bits.png"
        + (", pow2.png" if len({r['policy'] for r in rows}) > 1 else ""))
  return 0


if __name__ == "__main__":
  app.run(main)
