"""MobileNet-V2 on ImageNet with KURE, fine-tuned from torchvision's weights (the paper's recipe, batch 256,
50 epochs; see configs/imagenet.py).

  python train.py --config configs/mobilenet_v2.py --workdir runs/mobilenet_v2_kure \
      --config.dataset.data_dir=/path/to/tensorflow_datasets \
      --config.init_from=torchvision:/path/to/mobilenet_v2-b0353104.pth

Both overrides are optional: data defaults to TFDS's data_dir (~/tensorflow_datasets), weights
to torchvision's download cache (~/.cache/torch/hub/checkpoints/mobilenet_v2-b0353104.pth).
"""

from configs import imagenet


def get_config():
  return imagenet.get_config("mobilenet_v2", batch_size=256, num_epochs=50)
