"""NeuMF on MovieLens-1M (NCF, He et al. 2017): implicit feedback, leave-one-out HR@10 / NDCG@10.

  python train.py --config configs/movielens_neumf.py --workdir runs/ncf

The paper's recipe: Adam at 0.001, batch 256, 4 sampled negatives per positive (redrawn every epoch),
8 predictive factors, MLP 64-32-16-8, no weight decay, ~20 epochs; NeuMF here is trained from scratch
(no GMF/MLP pretraining), which the paper reports at HR@10 ≈ 0.69-0.70. HR@10 and NDCG@10 are logged as
fractions (eval rows 'hr@10', 'ndcg@10'). The data: NCF's files in ../shared/data/movielens (the default),
or --config.dataset.data_dir=FOLDER.

KURE and the quantizers cover all four dense layers (layer1…layer3 and prediction) and their inputs: NeuMF
has no image stem or classifier to keep in float (the rebuttal quantizes every activation), so skip_stem and
skip_head are off; the embedding tables stay in float (model_kwargs.quantize_embeddings=True quantizes them).
With KURE on the kernels and on their inputs:

  python train.py --config configs/movielens_neumf.py --workdir runs/ncf_kure \
      --config.kure.weight=1.0 --config.kure.activations=0.1
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "ranking"
  c.model = "neumf"
  c.model_kwargs.factors = 8          # GMF embedding size (the paper's "predictive factors")
  c.model_kwargs.mlp_layers = (64, 32, 16, 8)
  c.dataset.name = "movielens"
  c.dataset.num_classes = 1           # one logit per (user, item)
  c.dataset.num_negatives = 4
  c.batch_size = 256
  c.eval_batch_size = 1000            # users a batch (each with its 100 candidates)
  c.num_epochs = 20
  c.optimizer.name = "adam"
  c.optimizer.weight_decay = 0.0
  c.schedule.name = "constant"
  c.schedule.learning_rate = 0.001
  c.schedule.warmup_epochs = 0.0
  c.checkpoint_every_steps = 5000     # an epoch is 19,417 steps
  c.log_every_steps = 500
  c.kure.skip_stem = False            # every dense layer and its input: regularized and quantized
  c.kure.skip_head = False
  return c
