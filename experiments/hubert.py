r"""HuBERT-style pretraining, iteration 1: masked prediction of MFCC k-means units.

Launch (from the repository root):

  python -m jaxspeech.main --config experiments/hubert.py:tiny --workdir runs/hubert_tiny
  python -m jaxspeech.main --config experiments/hubert.py:paper --workdir runs/hubert_base \
      --config.data.manifest=/data/librispeech960.jsonl --config.mesh.shape.data=-1

Override any field with `--config.a.b=value` (e.g. `--config.train.num_steps=200`). Running the
same command again in the same workdir resumes from its latest checkpoint.

Variants:
  tiny   ~4 minutes on a 2-core CPU: the `tiny` encoder (4 layers, D=128, 1.2M parameters) on
         the built-in synthetic corpus, 8 x 1 s crops, K=50 clusters, 1000 steps, loss weight
         0.5 on unmasked frames (see `method.unmasked_weight`).
  paper  HuBERT-base iteration 1 as in fairseq's `hubert_base_librispeech.yaml` (Hsu et al.,
         2021): K=100 MFCC clusters, 400k updates (32k linear warm-up, then linear decay), Adam
         lr 5e-4 (betas 0.9/0.98, eps 1e-6, weight decay 0.01), clip 10, mask p=0.8 span 10,
         final_dim 256, logit temperature 0.1, dropout 0.1; 32 GPUs x 1.4 M samples per batch
         ~= 176 crops of 250k samples (15.6 s, fairseq's max_sample_size). Not reproduced here:
         encoder layerdrop 0.05 and fairseq's variable-length batching (crops are padded to one
         static length instead). Numbers from the yaml are unverified against the paper.
"""

from __future__ import annotations

import ml_collections

from jaxspeech.methods.base import model_config

# Logical axis -> mesh axes (maxtext-style rules; parallelism is data). Logical names are those
# the layers put on their weights (jaxspeech/layers/partitioning.py).
DEFAULT_RULES = (
  ('embed', 'fsdp'),
  ('mlp', 'model'),
  ('heads', 'model'),
  ('kv', None),
  ('vocab', None),
  ('conv_in', None),
  ('conv_out', 'fsdp'),
  ('kernel', None),
  ('norm', None),
)


VARIANTS = ('tiny', 'paper')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/hubert.py: unknown variant {variant!r} (tiny, paper)')
  tiny = variant == 'tiny'
  c = ml_collections.ConfigDict()
  c.variant = variant
  # A jaxspeech workdir (its latest checkpoint's parameters) or an HF checkpoint folder
  # (encoder parameters via jaxspeech.interop). '' = start from scratch.
  c.init_from = ''

  # The encoder: an EncoderConfig preset plus any of its fields (None = the preset's value).
  c.model = model_config('tiny') if tiny else model_config(
    'hubert-base', hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
    feat_proj_dropout=0.1)

  c.data = ml_collections.ConfigDict()
  c.data.manifest = ''  # JSONL manifest (data_pipelines.manifest); '' = the built-in corpus
  c.data.cache_dir = ''  # where the built-in corpus is cached; '' = $JAXSPEECH_CACHE or ~/.cache
  c.data.builtin_utterances = 400  # size of the built-in corpus
  c.data.split = 'train'  # manifest rows with this `split` ('' = all rows)
  c.data.batch_size = 8 if tiny else 176  # global, across all hosts and devices
  c.data.num_samples = 16000 if tiny else 250_000  # crop / pad length (static shapes)
  c.data.num_workers = 0  # Grain worker processes (0 = in-process)
  c.data.seed = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'
  c.optim.learning_rate = 2e-3 if tiny else 5e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.01
  c.optim.schedule = 'linear'  # constant | linear | cosine | tri_stage
  c.optim.warmup_steps = 50 if tiny else 32_000
  c.optim.init_lr_ratio = 0.0
  c.optim.end_lr_ratio = 0.0
  c.optim.tri_stage_ratios = (0.1, 0.4, 0.5)
  c.optim.clip_norm = 10.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'model': 1})
  c.mesh.rules = DEFAULT_RULES

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000 if tiny else 400_000
  c.train.log_every = 50 if tiny else 200
  c.train.checkpoint_every = 250 if tiny else 5000
  c.train.keep_checkpoints = 2 if tiny else 5
  c.train.async_checkpointing = True
  c.train.seed = 0
  c.train.trainable = '.*'  # regex over '/'-joined parameter paths; the rest is frozen
  # Fault injection for tests of resume: SIGKILL the process right after this step's checkpoint
  # is durable (0 = off).
  c.train.kill_after_step = 0

  c.method = ml_collections.ConfigDict()
  c.method.name = 'hubert'
  c.method.num_clusters = 50 if tiny else 100
  c.method.kmeans_iters = 30 if tiny else 100
  c.method.kmeans_batches = 24 if tiny else 100  # batches of the corpus the k-means is fitted on
  # z-score each MFCC dimension before the k-means (False = raw MFCCs, fairseq's learn_kmeans.py).
  # Tiny, held-out speakers, K=64 on the last layer: z-scored targets gave PNMI 0.475, ABX
  # within / across 2.4% / 10.8%; raw targets 0.464, 3.5% / 17.1% (Nov 29).
  c.method.standardize_mfcc = True
  c.method.kmeans_max_frames = 20_000 if tiny else 1_000_000
  c.method.mask_prob = 0.8
  c.method.mask_length = 10
  c.method.head = 'cosine'  # cosine (HuBERT: projection + codeword embeddings) | linear
  c.method.final_dim = 64 if tiny else 256
  c.method.logit_temp = 0.1
  # Weight of the loss on unmasked frames. paper: 0 (HuBERT's alpha=1, masked frames only).
  # tiny: 0.5 (HuBERT's ablations use alpha=0.5 too): the local targets teach the conv front-end
  # fast, which on this CPU budget doubles the masked accuracy reached (measured: 12% vs 6% at
  # 400 steps; majority-class baseline 7%).
  c.method.unmasked_weight = 0.5 if tiny else 0.0
  c.lock()  # a misspelt key is an error, not a silently ignored new field
  return c
