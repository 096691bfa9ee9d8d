r"""Cross-modal discrete representation learning (Liu et al., ACL 2022; SEEDS §9): two encoders
(audio, visual) whose fine-grained units are vector-quantised against ONE shared EMA codebook and
matched by Cross-Modal Code Matching, plus a contrastive loss on summary embeddings; retrieval by
cosine of the summaries + alpha x the code-matching similarity (`jaxspeech.methods.cmcm`).

  python -m data_pipelines.av_pairs --out av.jsonl --seed 0   # optional: built on first use
  python -m jaxspeech.main --config experiments/cmcm.py:tiny --workdir runs/cmcm
  python -m jaxspeech.main --config experiments/cmcm.py:tiny --workdir runs/cmcm_off \
      --config.method.cmcm_weight=0      # the summary-only baseline (same everything else)
  python -m jaxspeech.evaluate --checkpoint runs/cmcm --task retrieval --split test
  python -m benchmarks.cmcm_study --out runs/cmcm_study   # cmcm on / off x 3 seeds, table, PNG

Overrides: `method.cmcm_weight` (lambda of the CMCM loss; 0 = the summary-only baseline: loss =
the summary InfoNCE alone, the codebook only observes the units and retrieval uses the summaries
alone), `method.alpha` (weight of the code similarity in retrieval; ignored when cmcm_weight is
0), `method.codebook_size`, `method.code_temperature`, `method.temperature`.

Variants:
  tiny   real paired data: FSDD spoken digits (4 training speakers, 2 unseen test speakers) x
         scikit-learn's 8x8 digit scans (80/20 image split), paired by class
         (`data_pipelines.av_pairs`, seed `method.pair_seed`), as `experiments/uavm.py:tiny`.
         Audio: 39-d MFCC at 100 Hz, 1 s (100 frames, 4 stacked -> 25 units); visual: the image's
         8 rows as 8 frames (8 units). Per modality width 64, 4 heads, 2 blocks, dropout 0.1;
         units of 32 dims, a shared codebook of 64 codewords (EMA decay 0.99), summaries of 64
         dims; InfoNCE temperature 0.1, cmcm_weight 1, commitment 0.25, alpha 0.1; batch 64,
         AdamW 2e-3 cosine, 1200 steps: 2.7-3.4 min per run on this 2-core CPU (shared with
         other jobs), data, compilation and the final retrieval evaluation included.
  paper  Places audio captions x images as feature files a user extracted (the paper's
         image-speech setting): rows {"audio_features": ABS.npy [T, 40] log-Mel frames at 100 Hz
         (DAVEnet's input; cropped / padded to 1024 frames = 10.24 s, 4 stacked -> 256 units),
         "visual_features": ABS.npy [49, 2048] (a ResNet-50's 7 x 7 grid: 49 "pixels"), "split",
         optional "label"}; `config.data.manifest` is required. Width 512, 8 heads, 4 blocks,
         codebook 1024 x 256, summaries 1024, batch 128, AdamW 1e-4. These sizes are this
         repository's choice at that scale, NOT checked against the paper's code or its encoders
         (ResDAVEnet / ResNet-50 fine-tuned end to end there; frozen features here).
"""

from __future__ import annotations

import ml_collections

from experiments import _base

VARIANTS = ('tiny', 'paper')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/cmcm.py: unknown variant {variant!r} (tiny, paper)')
  tiny = variant == 'tiny'
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''
  c.model = ml_collections.ConfigDict()  # sizes are method fields (no speech encoder)
  c.data = _base.data_config(batch_size=64 if tiny else 128, num_samples=1)  # no waveforms
  num_steps = 1200 if tiny else 50_000
  c.optim = _base.optim_config(learning_rate=2e-3 if tiny else 1e-4, b1=0.9, b2=0.999, eps=1e-8,
                               weight_decay=0.01, schedule='cosine',
                               warmup_steps=100 if tiny else 2000, clip_norm=1.0)
  c.mesh = _base.mesh_config()
  c.train = _base.train_config(num_steps=num_steps, log_every=100 if tiny else 500,
                               checkpoint_every=0 if tiny else 5000)
  c.train.eval_every = num_steps if tiny else 5000  # tiny: one retrieval evaluation, at the end
  m = c.method = ml_collections.ConfigDict()
  m.name = 'cmcm'
  m.cmcm_weight = 1.0  # lambda of the CMCM loss; 0 = the summary-only baseline
  m.alpha = 0.1  # retrieval: cosine(summaries) + alpha * cmcm_similarity (0 when cmcm is off)
  m.temperature = 0.1  # summary InfoNCE
  m.code_temperature = 1.0  # Pbar = mean softmax(-||u - e|| / code_temperature) (ops.vq default)
  m.commitment_cost = 0.25  # VQ-VAE's beta
  m.codebook_size = 64 if tiny else 1024
  m.codebook_decay = 0.99
  m.audio_input = 'mfcc' if tiny else 'features'
  m.visual_input = 'image_rows' if tiny else 'features'
  m.audio_features_key = 'audio_features'  # row keys of .npy files ('features' inputs)
  m.visual_features_key = 'visual_features'
  m.audio_dim = 39 if tiny else 40
  m.visual_dim = 8 if tiny else 2048
  m.audio_frames = 100 if tiny else 1024  # static length (frames before stacking)
  m.audio_stack = 4  # 100 Hz -> 25 units per second
  m.visual_frames = 8 if tiny else 49
  m.num_classes = 10 if tiny else 1  # labels are only read by the evaluation (digit classes)
  m.dim = 64 if tiny else 512
  m.num_heads = 4 if tiny else 8
  m.depth = 2 if tiny else 4
  m.mlp_ratio = 4
  m.code_dim = 32 if tiny else 256
  m.embed_dim = 64 if tiny else 1024
  m.dropout = 0.1
  # The built-in pairs (`data_pipelines.av_pairs`; used when data.manifest is '').
  m.fsdd_root = ''  # '' = ../shared/data/fsdd or $JAXSPEECH_FSDD
  m.pair_seed = 0
  m.test_speakers = 2
  m.image_test_fraction = 0.2
  c.evals = ml_collections.ConfigDict()
  c.evals.test = ml_collections.ConfigDict({'task': 'retrieval', 'split': 'test'})
  c.lock()
  return c
