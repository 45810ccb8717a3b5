"""The paper's ImageNet fine-tuning recipe with KURE, shared by resnet18/resnet50/mobilenet_v2.

Hyperparameters (supplementary material): KURE target 1.8, λ = 1.0, SGD momentum 0.9,
weight decay 1e-4, learning rate 1e-3 decayed 10× every 30 epochs, fine-tuning from
`init_from`. Data: TFDS `imagenet2012` built as ArrayRecord (`tfds build imagenet2012
--manual_dir DIR --file_format array_record`), or an ImageNet folder with train/ and val/
class folders (`--config.dataset.name=folder --config.dataset.data_dir=DIR`).
"""

import ml_collections

from configs import default


def get_config(model: str = "resnet18", batch_size: int = 256) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model = model
  c.dataset.name = "imagenet2012"
  c.dataset.image_size = 224
  c.dataset.num_classes = 1000
  c.dataset.eval_split = "validation"
  c.batch_size = batch_size
  c.eval_batch_size = 500
  c.num_epochs = 90
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "step"
  c.schedule.learning_rate = 1e-3
  c.schedule.decay_epochs = 30
  c.schedule.decay_factor = 0.1
  c.kure.weight = 1.0
  c.kure.target = 1.8
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100
  return c
