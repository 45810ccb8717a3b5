"""Defaults shared by every config; each config file starts from these and changes a few.

Every field can be overridden on the command line, e.g. ``--config.kure.weight=0``.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "resnet20"
  c.model_kwargs = ml_collections.ConfigDict()

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "cifar10"          # a TFDS name, or "folder" for split/class/image.jpg folders (or their tarballs)
  c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir, or the folder holding the splits
  c.dataset.image_size = 32
  c.dataset.num_classes = 10
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.cache = True              # small datasets: decoded in memory + a disk copy in ~/.cache/kure_jax
                                      # (a path: the disk copy goes there; False: memory only)

  c.batch_size = 128                  # global, over all devices and hosts
  c.eval_batch_size = 500
  c.num_epochs = 1
  c.max_steps = config_dict.placeholder(int)  # optional cap on the number of steps
  c.dtype = "float32"                 # training compute: float32 | bfloat16 (mixed precision: params, optimizer,
                                      # BatchNorm statistics, kurtosis and loss stay float32)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"          # cosine | step | constant
  c.schedule.learning_rate = 0.1
  c.schedule.warmup_epochs = 0.0
  c.schedule.decay_epochs = 30        # step: multiply by decay_factor every decay_epochs
  c.schedule.decay_factor = 0.1

  c.kure = ml_collections.ConfigDict()
  c.kure.weight = 0.0                 # λ; 0 turns KURE off
  c.kure.target = 1.8                 # K_T: the kurtosis of a uniform distribution
  c.kure.include = ""                 # regex over kernel paths; "" selects every conv/dense kernel
  c.kure.exclude = ""                 # regex removing kernels after include
  c.kure.skip_stem = True             # the first layer and the classifier stay unregularized,
  c.kure.skip_head = True             # as in the paper (and stay in float when quantizing)
  c.kure.reduction = "mean"           # mean | sum | max over the selected layers
  c.kure.activations = 0.0            # λ_a: kurtosis of the selected layers' inputs too (0: off)

  # the regularizer: KURE (above), or the gradient-ℓ1 baseline of Alizadeh et al. in its place
  c.reg = ml_collections.ConfigDict()
  c.reg.kind = "kure"                 # kure | grad_l1 (λ·‖∇_W CE‖₁ on the kernels KURE would select)
  c.reg.grad_l1_weight = 0.001        # its λ (used when reg.kind = "grad_l1"; then kure.weight must be 0);
                                      # ‖∇_W CE‖₁ sums over every weight: ≈ 180 for the 82.7% ResNet-20, so 0.001
                                      # starts near KURE's penalty, while 0.05 wrecked accuracy within 100 steps

  # quantization-aware training (the penalty above acts on the latent float weights)
  c.quant = ml_collections.ConfigDict()
  c.quant.method = "none"             # none | dorefa | lsq
  c.quant.w_bits = 4
  c.quant.a_bits = 4                  # 0 keeps activations in float
  c.quant.include = ""                # regexes over kernel paths, as for kure
  c.quant.exclude = ""
  c.quant.skip_stem = True            # the first layer and the classifier stay in float,
  c.quant.skip_head = True            # as in the paper

  # eval.py: the robustness grid (every combination is scored in one compiled call)
  c.eval = ml_collections.ConfigDict()
  c.eval.bits = (2, 3, 4, 8)
  c.eval.ratio_min = 0.7              # step ratios Δ/Δ̃: ratio_steps points from ratio_min to ratio_max
  c.eval.ratio_max = 1.3
  c.eval.ratio_steps = 21
  c.eval.policies = ("exact", "pow2_nearest")   # exact | pow2_nearest | pow2_floor | pow2_ceil
  c.eval.methods = ("mse",)           # base step Δ̃: mse | max | aciq_gauss | aciq_laplace | learned (QAT) | lapq
  c.eval.targets = ("weights",)       # weights | activations | both
  c.eval.granularity = "tensor"       # tensor | channel (weight steps)
  c.eval.calibration_batches = 1      # batches of the train split for activation steps
  c.eval.fold_bn = False              # fold BatchNorm into the conv kernels before quantizing them
  c.eval.chunk = 1                    # grid points vmapped at once; 1 is fastest on CPU
  c.eval.bias_correction = "none"     # none | mean | mean_std: per output channel, restore the float mean (and std)
  c.eval.lapq_images = 512            # method lapq: labelled train images for its calibration loss
  c.eval.lapq_iterations = 2          # method lapq: Powell iterations (SciPy maxiter)
  c.eval.lapq_max_evals = config_dict.placeholder(int)  # method lapq: optional cap on loss evaluations (SciPy maxfev)

  c.init_from = ""                    # a workdir to fine-tune from (params and batch statistics)
  c.seed = 0
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.progress = True
  return c
