"""Defaults shared by every config; each config file starts from these and changes a few.

Every field can be overridden on the command line, e.g. ``--config.kure.weight=0``.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "resnet20"                # resnet20 (CIFAR) | resnet18 | resnet50 | mobilenet_v2 (torchvision's) |
                                      # neumf (NCF, task 'ranking')
  c.task = "classification"           # classification (images: cross-entropy, top-1/top-5 in %) | ranking (NCF
                                      # implicit feedback on dataset.name='movielens': binary cross-entropy,
                                      # HR@10 / NDCG@10 as fractions); see kure_jax/tasks.py
  c.model_kwargs = ml_collections.ConfigDict()  # keyword arguments of the model class (a config file adds its
                                      # model's own, e.g. configs/movielens_neumf.py's factors)
  c.model_kwargs.weight_grid = config_dict.placeholder(str)  # the grid every quantized layer puts its weights on
                                      # in QAT and train_sweep: signed | narrow | midrise | unsigned; unset: signed
                                      # (DoReFa: midrise, its own). eval.py's grid is eval.weight_grid

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "cifar10"          # a TFDS name, or "folder" for split/class/image.jpg folders (or their tarballs),
                                      # or "movielens" (NCF's ML-1M files; task 'ranking')
  c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir, or the folder holding the splits (movielens:
                                      # the folder of the ml-1m.*.gz files; unset: ../shared/data/movielens)
  c.dataset.num_negatives = 4         # movielens: sampled negatives per training positive, redrawn every epoch
  c.dataset.image_size = 32           # input resolution (square)
  c.dataset.num_classes = 10          # checked against the data
  c.dataset.train_split = "train"     # split names (TFDS slices like "train[:90%]" work too)
  c.dataset.eval_split = "test"       # the split evaluated every epoch and scored by eval.py
  c.dataset.cache = True              # small datasets: decoded in memory + a disk copy in ~/.cache/kure_jax
                                      # (a path: the disk copy goes there; False: memory only)
  c.dataset.preprocess = config_dict.placeholder(str)  # cifar (decode the split once into memory) | imagenet
                                      # (decode per example); unset: cifar for cifar10 and ≤ 64 px folders
  c.dataset.mean = config_dict.placeholder(tuple)  # per-channel normalization on the [0, 1] scale, e.g.
  c.dataset.std = config_dict.placeholder(tuple)   # "(0.5,0.5,0.5)"; unset: CIFAR-10's or ImageNet's by preprocess

  c.batch_size = 128                  # global, over all devices and hosts
  c.eval_batch_size = 500             # global, for the epoch evaluation and eval.py
  c.num_epochs = 1                    # training length in epochs of the train split
  c.max_steps = config_dict.placeholder(int)  # optional cap on the number of steps
  c.cpu_devices = 1                   # on a CPU: split it into this many XLA devices and train data parallel over
                                      # them (2 on a 2-core CPU: 1.3x faster steps); set before JAX starts
  c.dtype = "float32"                 # training compute: float32 | bfloat16 (mixed precision: params, optimizer,
                                      # BatchNorm statistics, kurtosis and loss stay float32)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"            # sgd (PyTorch-style coupled weight decay) | adam | adamw
  c.optimizer.momentum = 0.9          # sgd only (0: plain SGD)
  c.optimizer.nesterov = False        # sgd only
  c.optimizer.weight_decay = 1e-4     # on the params (not on LSQ's learned steps)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"          # cosine | step | constant
  c.schedule.learning_rate = 0.1      # peak learning rate
  c.schedule.warmup_epochs = 0.0      # linear warmup from 0, in epochs
  c.schedule.decay_epochs = 30        # step: multiply by decay_factor every decay_epochs
  c.schedule.decay_factor = 0.1       # step: the factor

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
  c.quant.w_bits = 4                  # weight bits, 2…16
  c.quant.a_bits = 4                  # 0 keeps activations in float
  c.quant.dorefa_form = "inputs"      # DoReFa's activations: inputs (the quantized layers' inputs) | relus (the
                                      # authors' model: every ReLU, residual stream included, clamped to [0, 1] and
                                      # quantized; ResNets only)
  c.quant.include = ""                # regexes over kernel paths, as for kure
  c.quant.exclude = ""                # regex removing layers after include
  c.quant.skip_stem = True            # the first layer and the classifier stay in float,
  c.quant.skip_head = True            # as in the paper

  # eval.py: the robustness grid (every combination is scored in one compiled call)
  c.eval = ml_collections.ConfigDict()
  # A preset fills in the quantizer conventions below that are left unset; each can be overridden on its own.
  #   ours:    signed weight grid (zero included), no bias correction, the layers KURE regularizes (every conv and
  #            dense but the stem and the classifier), MSE-optimal base steps
  #   authors: as the KURE authors' code: midrise weight grid (2^M levels, no zero), per-channel mean bias
  #            correction, every conv but the first and the last (dense layers float), LAPQ base steps (512 images,
  #            2 Powell iterations, no evaluation cap), so step ratios are relative to the LAPQ step
  c.eval.preset = "ours"              # ours | authors
  c.eval.weight_grid = config_dict.placeholder(str)  # signed | narrow | midrise; unset: the preset's (a DoReFa
                                      # checkpoint always uses its own midrise grid)
  c.eval.layers = config_dict.placeholder(str)  # which kernels are quantized: kure (config.kure's selection) |
                                      # inner_convs (every conv but the first and last called); unset: the preset's
  c.eval.dorefa_mode = "symmetric"    # DoReFa checkpoints' step perturbation: symmetric (Δ = ratio·Δ̃ on the
                                      # midrise grid, weights and activations) | sliding (the authors': weights only,
                                      # DoReFa's scale × ratio, i.e. Δ = Δ̃/ratio, grid anchored at −1, no clamp, so
                                      # levels are gained or lost: 11 at 0.7, 21 at 1.3 for 4 bits)
  c.eval.bits = (2, 3, 4, 8)          # bit-widths, 2…16
  c.eval.ratio_min = 0.7              # step ratios Δ/Δ̃: ratio_steps points from ratio_min to ratio_max
  c.eval.ratio_max = 1.3              # (1.0 is always included)
  c.eval.ratio_steps = 21             # number of step ratios
  c.eval.policies = ("exact", "pow2_nearest")   # exact | pow2_nearest | pow2_floor | pow2_ceil
  c.eval.methods = config_dict.placeholder(tuple)  # base step Δ̃: mse | max | aciq_gauss | aciq_laplace |
                                      # learned (QAT) | lapq; unset: the preset's (ours ('mse',), authors ('lapq',))
  c.eval.targets = ("weights",)       # weights | activations | both
  c.eval.formats = ()                 # number formats scored beside the integer grid, e.g. "('int4','fp8_e4m3',
                                      # 'fp4_e2m1','mxfp4','nvfp4')" (kure_jax.core.formats.FORMATS): each at its max
                                      # scaling × the step ratios, in the same compiled call
  c.eval.granularity = "tensor"       # tensor | channel (weight steps)
  c.eval.calibration_batches = 1      # batches of the train split for activation steps
  c.eval.fold_bn = False              # fold BatchNorm into the conv kernels before quantizing them
  c.eval.chunk = 1                    # grid points vmapped at once; 1 is fastest on CPU
  c.eval.bias_correction = config_dict.placeholder(str)  # none | mean | mean_std: per output channel, restore the
                                      # float mean (and std); unset: the preset's (ours none, authors mean)
  c.eval.lapq_images = 512            # method lapq: labelled train images for its calibration loss
  c.eval.lapq_iterations = 2          # method lapq: Powell iterations (SciPy maxiter)
  c.eval.lapq_max_evals = config_dict.placeholder(int)  # method lapq: optional cap on loss evaluations (SciPy maxfev)
  c.eval.lapq_cache = ""              # method lapq: a folder where LAPQ's steps are kept per weights and settings
                                      # and reused by later evaluations ("" = search every time)

  # train.py: a small robustness grid scored at every epoch evaluation (eval.py's sweep on the layers config.kure
  # selects, or a QAT run's own), logged in the eval record as sweep/<w|a|wa><bits>_r<ratio>/<metric>
  c.train_sweep = ml_collections.ConfigDict()
  c.train_sweep.bits = ()             # bit-widths, 2…16; () turns the sweep off
  c.train_sweep.ratios = (1.0,)       # step ratios Δ/Δ̃
  c.train_sweep.targets = ("weights",)  # weights | activations | both (activation steps: calibrated on a random
                                      # eval_batch_size sample of the train split; ranking: the first train batch)
  c.train_sweep.method = "mse"        # base step Δ̃: mse | max | aciq_gauss | aciq_laplace | learned (QAT runs)
  c.train_sweep.batches = 0           # eval batches scored (the first N); 0: the whole eval split

  c.init_from = ""                    # a workdir to fine-tune from (params and batch statistics), one step's
                                      # folder in it (runs/x/checkpoints/4), or torchvision:PATH (a .pth)
  c.resume_step = config_dict.placeholder(int)  # resume from this step of <workdir>/checkpoints (unset: the newest);
                                      # for a damaged newest checkpoint: damaged newer ones are moved to
                                      # <workdir>/checkpoints_discarded, an intact newer one stops the run
  c.seed = 0                          # init, data order and augmentation
  c.checkpoint_every_steps = 500      # also saved at the end and on SIGTERM/Ctrl-C
  c.keep_checkpoints = 3              # the newest K are kept
  c.log_every_steps = 50              # train rows in metrics.jsonl (and the non-finite check)
  c.progress = True                   # tqdm progress bars
  return c
