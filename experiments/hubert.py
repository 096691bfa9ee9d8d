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

from experiments._base import data_config, mesh_config, optim_config, train_config
from jaxspeech.methods.base import model_config

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
  c.data = data_config(batch_size=8 if tiny else 176, num_samples=16000 if tiny else 250_000)
  c.optim = optim_config(learning_rate=2e-3 if tiny else 5e-4,
                         warmup_steps=50 if tiny else 32_000)
  c.mesh = mesh_config()
  c.train = train_config(
    num_steps=1000 if tiny else 400_000,
    log_every=50 if tiny else 200,
    checkpoint_every=250 if tiny else 5000,
    keep_checkpoints=2 if tiny else 5,
  )

  c.method = ml_collections.ConfigDict()
  c.method.name = 'hubert'
  c.method.num_clusters = 50 if tiny else 100
  c.method.kmeans_iters = 30 if tiny else 100
  c.method.kmeans_batches = 24 if tiny else 100  # batches of the corpus the k-means is fitted on
  # z-score each MFCC dimension before the k-means (False = raw MFCCs, fairseq's learn_kmeans.py).
  # Tiny, held-out speakers, K=64 on the last layer: z-scored targets gave PNMI 0.475, ABX
  # within / across 2.4% / 10.8%; raw targets 0.464, 3.5% / 17.1% (Nov 29).
  c.method.standardize_mfcc = True
  # The waveform scale the MFCCs see: 'fairseq' = samples in [-1, 1], as fairseq's
  # dump_mfcc_feature.py feeds torchaudio.compliance.kaldi.mfcc; 'kaldi' = x 32768 (int16, Kaldi's
  # compute-mfcc-feats; this project's targets before Dec 2). Changes c0 by a constant and, via
  # the log floor, c1-c12 of quiet frames.
  c.method.mfcc_input_scale = 'fairseq'
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
