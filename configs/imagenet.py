"""The paper's ImageNet fine-tuning recipe with KURE, shared by resnet18/resnet50/mobilenet_v2.

Hyperparameters (the paper's supplementary material and its reference implementation's
commands): start from torchvision's pretrained IMAGENET1K_V1 weights, KURE target 1.8,
λ = 1.0 (mean over every conv/linear kernel but the first and the last), SGD momentum 0.9,
weight decay 1e-4, learning rate 1e-3 decayed 10× every 30 epochs; 90 epochs for the
ResNets, 50 for MobileNet-V2; batch 256 (ResNet-50: 128).

Weights: ``init_from = "torchvision:PATH"``, by default where torchvision caches its
download (`kure_jax.models.torchvision_weights.default_path`); get the file with
``python -c "import torchvision; torchvision.models.resnet18(weights='IMAGENET1K_V1')"``
or from https://download.pytorch.org/models/ (reading a .pth needs the `torchvision`
extra; `python scripts/convert_torchvision.py` turns it into a checkpoint that needs no torch).

Data: TFDS `imagenet2012` built as ArrayRecord (`tfds build imagenet2012 --data_dir DIR
--manual_dir MANUAL --file_format array_record` with ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in MANUAL; then ``--config.dataset.data_dir=DIR``), or an ImageNet
folder with train/ and val/ class folders (``--config.dataset.name=folder
--config.dataset.data_dir=DIR``).
"""

import ml_collections

from configs import default
from kure_jax.models import torchvision_weights


def get_config(model: str = "resnet18", batch_size: int = 256, num_epochs: int = 90) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model = model
  c.dataset.name = "imagenet2012"
  c.dataset.image_size = 224
  c.dataset.num_classes = 1000
  c.dataset.eval_split = "validation"
  c.batch_size = batch_size
  c.eval_batch_size = 500
  c.num_epochs = num_epochs
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "step"
  c.schedule.learning_rate = 1e-3
  c.schedule.warmup_epochs = 0.0
  c.schedule.decay_epochs = 30
  c.schedule.decay_factor = 0.1
  c.kure.weight = 1.0
  c.kure.target = 1.8
  c.kure.reduction = "mean"
  c.init_from = torchvision_weights.PREFIX + torchvision_weights.default_path(model)
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100
  return c
