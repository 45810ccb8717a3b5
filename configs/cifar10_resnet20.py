"""ResNet-20 on CIFAR-10: the CPU workhorse.

  python train.py --config configs/cifar10_resnet20.py --workdir runs/r20

Offline, from the ImageNet-style JPEG folders or tarballs of CIFAR-10:

  python train.py --config configs/cifar10_resnet20.py --workdir runs/r20 \
      --config.dataset.name=folder --config.dataset.data_dir=../shared/data/cifar10

With KURE (λ = 1, target 1.8), e.g. fine-tuning the float model:

  python train.py --config configs/cifar10_resnet20.py --workdir runs/r20_kure \
      --config.kure.weight=1.0 --config.init_from=runs/r20
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model = "resnet20"
  c.dataset.name = "cifar10"
  c.dataset.image_size = 32
  c.dataset.num_classes = 10
  c.batch_size = 128
  c.num_epochs = 120                  # the study's converged base (see docs/RESULTS.md for its accuracy and time)
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "cosine"
  c.schedule.learning_rate = 0.1
  c.schedule.warmup_epochs = 1.0
  c.checkpoint_every_steps = 390      # about one epoch
  return c
