r"""UAVM (Gong et al., IEEE SPL 2022): one transformer shared by audio and video, trained one
modality per step (p = 0.5), evaluated audio-only, video-only and AV (mean of the logits); the
baselines are config options (`method.sharing`: 'shared' = UAVM, 'separate', 'fusion').

  python -m data_pipelines.av_pairs --out av.jsonl --seed 0   # optional: built on first use
  python -m jaxspeech.main --config experiments/uavm.py:tiny --workdir runs/uavm
  python -m jaxspeech.main --config experiments/uavm.py:tiny --workdir runs/uavm_sep \
      --config.method.sharing=separate
  python -m jaxspeech.evaluate --checkpoint runs/uavm --task av_classification --split test \
      [--fit_split test]    # + the per-layer modality probe (halves of the test rows)
  python -m benchmarks.uavm_study --out runs/uavm_study   # 3 variants x 3 seeds, table

Variants:
  tiny   real paired data: FSDD spoken digits (4 training speakers, 2 unseen test speakers) x
         scikit-learn's 8x8 digit scans (80/20 image split), paired by class
         (`data_pipelines.av_pairs`, seed `method.pair_seed`). Audio: 39-d MFCC at 100 Hz, 1 s
         (100 frames, 4 stacked -> 25 tokens); video: the image's 8 rows as 8 frames. Width 64,
         4 heads, 1 modality-specific + 2 upper blocks, dropout 0.1, batch 64, AdamW 2e-3
         cosine, 1000 steps (1-2.5 min on a 2-core CPU, evaluation included).
  paper  the reference's VGGSound recipe (`YuanGongND/uavm`, egs/vggsound/run_uavm.sh): clip
         features of 30 steps x 1024 per modality (audio and ConvNeXt video features the user
         extracted), width 1024, 4 heads, 3 + 3 blocks, 309 classes, batch 144, lr 5e-5,
         label smoothing 0.1, ~10 epochs of VGGSound (183k clips: 12,700 steps).
         `config.data.manifest` is required: rows {"audio_features": ABS.npy, "visual_features":
         ABS.npy, "label", "split"}. Not reproduced: mixup (0.5), class-balanced sampling and
         the per-epoch x0.5 learning-rate decay (a cosine schedule stands in).
"""

from __future__ import annotations

import ml_collections

from experiments import _base

VARIANTS = ('tiny', 'paper')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/uavm.py: unknown variant {variant!r} (tiny, paper)')
  tiny = variant == 'tiny'
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''
  c.model = ml_collections.ConfigDict()  # sizes are method fields (no speech encoder)
  c.data = _base.data_config(batch_size=64 if tiny else 144, num_samples=1)  # no waveforms
  num_steps = 1000 if tiny else 12_700
  # paper: the reference's Adam(lr 5e-5, betas (0.95, 0.999), weight decay 5e-7).
  c.optim = _base.optim_config(learning_rate=2e-3 if tiny else 5e-5, b1=0.9 if tiny else 0.95,
                               b2=0.999, eps=1e-8, weight_decay=0.01 if tiny else 5e-7,
                               schedule='cosine', warmup_steps=100 if tiny else 1000,
                               clip_norm=1.0)
  c.mesh = _base.mesh_config()
  c.train = _base.train_config(num_steps=num_steps, log_every=100 if tiny else 200,
                               checkpoint_every=0 if tiny else 2000)
  c.train.eval_every = 500 if tiny else 2000
  m = c.method = ml_collections.ConfigDict()
  m.name = 'uavm'
  m.sharing = 'shared'  # 'shared' (UAVM) | 'separate' | 'fusion' (cross-modal attention)
  m.audio_prob = 0.5  # P(a training step uses audio); the reference's a_tr_prob
  m.label_smoothing = 0.1
  m.audio_input = 'mfcc' if tiny else 'features'
  m.visual_input = 'image_rows' if tiny else 'features'
  m.audio_features_key = 'audio_features'  # row keys of .npy files ('features' inputs)
  m.visual_features_key = 'visual_features'
  m.audio_dim = 39 if tiny else 1024
  m.visual_dim = 8 if tiny else 1024
  m.audio_frames = 100 if tiny else 30  # static length (frames before stacking)
  m.audio_stack = 4 if tiny else 1  # 100 frames at 100 Hz -> 25 tokens of 40 ms
  m.visual_frames = 8 if tiny else 30
  m.num_classes = 10 if tiny else 309
  m.dim = 64 if tiny else 1024
  m.num_heads = 4
  m.depth_i = 1 if tiny else 3
  m.depth_s = 2 if tiny else 3
  m.mlp_ratio = 4
  # Width of the upper stage (the reference's s_embed_dim; 0 = dim, its accuracy recipe). The
  # reference's probing runs narrow it (egs/vggsound testfm69 *-se16-*: probe ~0.55-0.77 on the
  # shared layers vs ~1.0 at 1024); `benchmarks/uavm_study.py --upper-dim 16` runs that setting.
  m.upper_dim = 0
  m.dropout = 0.1 if tiny else 0.0
  # The built-in pairs (`data_pipelines.av_pairs`; used when data.manifest is '').
  m.fsdd_root = ''  # '' = ../shared/data/fsdd or $JAXSPEECH_FSDD
  m.pair_seed = 0
  m.test_speakers = 2
  m.image_test_fraction = 0.2
  c.evals = ml_collections.ConfigDict()
  c.evals.test = ml_collections.ConfigDict({'task': 'av_classification', 'split': 'test'})
  c.lock()
  return c
