"""NeuMF on MovieLens-1M (NCF, He et al. 2017): implicit feedback, leave-one-out HR@10 / NDCG@10.

  python train.py --config configs/movielens_neumf.py --workdir runs/ncf

The NCF paper's recipe where it has one: Adam at 0.001, batch 256, 4 sampled negatives per positive
(redrawn every epoch), no weight decay, binary cross-entropy; NeuMF trained from scratch (no GMF/MLP
pretraining), which the paper reports at HR@10 ≈ 0.69-0.70. Chosen here (docs/ncf.md, seed 0): 16 predictive
factors with an MLP 128-64-32-16 (the paper's grid spans 8-64) and 12 epochs of cosine decay. With 8 factors
(MLP 64-32-16-8, 20 epochs at a constant rate) NeuMF reached 0.676 ± 0.004 over three seeds; 16 factors at a
constant rate overfit after ~10 epochs (last epoch 0.680, best 0.690), cosine over 20 epochs too (0.679 at
epoch 15), over 8 it stops short (0.685). HR@10 and NDCG@10 are logged as fractions (eval rows 'hr@10',
'ndcg@10'). The data: NCF's files in ../shared/data/movielens (the default), or --config.dataset.data_dir=FOLDER.

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
  c.model_kwargs.factors = 16         # GMF embedding size (the paper's "predictive factors")
  c.model_kwargs.mlp_layers = (128, 64, 32, 16)  # the first is the concatenated user+item MLP embedding
  c.model_kwargs.quantize_embeddings = False  # True: the embedding tables are quantized (and regularized) too
  c.dataset.name = "movielens"
  c.dataset.num_classes = 1           # one logit per (user, item)
  c.dataset.num_negatives = 4
  c.batch_size = 256
  c.eval_batch_size = 1000            # users a batch (each with its 100 candidates)
  c.num_epochs = 12
  c.optimizer.name = "adam"
  c.optimizer.weight_decay = 0.0
  c.schedule.name = "cosine"          # to 0 over the run: with a constant rate 16 factors overfit after ~10 epochs
  c.schedule.learning_rate = 0.001
  c.schedule.warmup_epochs = 0.0
  c.checkpoint_every_steps = 5000     # an epoch is 19,417 steps
  c.log_every_steps = 500
  c.kure.skip_stem = False            # every dense layer and its input: regularized and quantized
  c.kure.skip_head = False
  return c
