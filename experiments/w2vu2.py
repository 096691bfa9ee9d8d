r"""wav2vec-U 2.0: unsupervised phone recognition from unpaired speech and text (a GAN).

  python -m jaxspeech.main --config experiments/w2vu2.py:tiny --workdir runs/w2vu2_mfcc
  python -m jaxspeech.w2vu run --workdir runs/w2vu    # the whole study: encoder, features,
                                                      # text, seeds, selection, PER table

`config.method.features` names the input: 'mfcc' (39-d MFCC + deltas at 50 Hz of the built-in
corpus, cached on demand) or, through `python -m jaxspeech.w2vu`, any encoder layer (an HF folder
or a jaxspeech workdir, `--layer`), cached once (`data_pipelines.features`) and given as
`config.data.manifest`. The text side is `config.method.text_manifest` (`python -m
data_pipelines.text`; '' = `text_sentences` sentences of the built-in grammar with seed
`text_seed`, minus every transcript of the audio corpus). Evaluation during training:
`config.evals.per` (PER of greedy decoding on the held-out speakers, against the alignments)
and `config.evals.selection` (the unsupervised selection metric: phone-LM perplexity of the
decoded training audio / vocabulary usage^2, fairseq `w2vu_generate.py`).

Variants:
  paper  fairseq `config/gan/w2vu2.yaml`: discriminator 384-d, depth 2, kernel 8, causal;
         generator kernel 9, stride 3, no bias, dropout 0.1, BatchNorm weight 30, residual;
         smoothness 1.5, gradient penalty 1.0, code penalty 3.0, mmi 0.5 on 64 MFCC clusters;
         Adam G 5e-5 / D 3e-4 (betas 0.5 / 0.98, eps 1e-6, D weight decay 1e-4), clip 5,
         D on odd steps and G on even ones, batch 160, 150k updates. (Input 1024-d: XLS-R
         layer features; here whatever the feature cache holds.)
  tiny   minutes on a 2-core CPU: the same model and losses with a 64-d discriminator, batch
         64 and learning rates 10x / 3x the paper's (G 5e-4, D 1e-3) for 3,000 updates.
"""

from __future__ import annotations

import ml_collections

from experiments import _base

VARIANTS = ('tiny', 'paper')


def _adam(lr: float, weight_decay: float, phase: int) -> ml_collections.ConfigDict:
  c = _base.optim_config(name='adam', learning_rate=lr, b1=0.5, b2=0.98, eps=1e-6,
                         weight_decay=weight_decay, schedule='constant', warmup_steps=0,
                         clip_norm=5.0)
  c.every, c.phase = 2, phase  # fairseq: discriminator on odd updates, generator on even ones
  c.frozen = ''
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/w2vu2.py: unknown variant {variant!r} (tiny, paper)')
  tiny = variant == 'tiny'
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''  # unused: the model starts from scratch on frozen, cached features
  c.model = ml_collections.ConfigDict()  # sizes are method fields (no encoder)
  c.data = _base.data_config(batch_size=64 if tiny else 160, num_samples=1)  # rows, not audio
  c.optim = ml_collections.ConfigDict({
    'generator': _adam(5e-4 if tiny else 5e-5, 0.0, phase=0),
    'discriminator': _adam(1e-3 if tiny else 3e-4, 1e-4, phase=1),
  })
  c.mesh = _base.mesh_config()
  c.train = _base.train_config(num_steps=3000 if tiny else 150_000, log_every=100,
                               checkpoint_every=1000)
  c.train.eval_every = 1000
  m = c.method = ml_collections.ConfigDict()
  m.name = 'w2vu2'
  m.supervised = False  # True: the same generator trained with CTC on true phones (reference)
  # Input features (see the module docstring) and their static shape.
  m.features = 'mfcc'
  m.feature_layer = 'last'  # encoder features: hidden-state index or 'last' (jaxspeech.w2vu)
  m.input_dim = 39
  m.max_frames = 192  # 3.84 s at 50 Hz: the built-in corpus's longest utterance is 3.7 s
  m.max_label_length = 64  # supervised reference: longest phone sequence
  # Text side.
  m.text_manifest = ''
  m.text_sentences = 2000
  m.text_seed = 1  # the audio corpus is seed 0
  # Silence in the text (fairseq phonemize_with_sil.py): between words with p = sil_prob, and at
  # the ends ('both'). The built-in corpus's audio starts with speech, ends in ~0.34 s of
  # silence and has silence inside only at punctuation (0.16 a sentence): tiny's text matches
  # it ('end', p = 0); a real corpus with leading silence keeps the paper's 'both' / 0.5.
  m.sil_prob = 0.0 if tiny else 0.5
  m.sil_surround = 'end' if tiny else 'both'
  m.text_rows = 2000  # text table rows held in the extra state
  m.max_text_length = 64
  # Generator.
  m.generator_kernel = 9
  m.generator_stride = 3
  m.generator_bias = False
  m.generator_dropout = 0.1
  m.generator_batch_norm = 30.0
  m.generator_residual = True
  m.aux_clusters = 64
  # Discriminator.
  m.discriminator_dim = 64 if tiny else 384
  m.discriminator_kernel = 8
  m.discriminator_depth = 2
  m.discriminator_causal = True
  m.discriminator_dropout = 0.0
  # Loss weights.
  m.gradient_penalty = 1.0
  m.code_penalty = 3.0
  m.smoothness_weight = 1.5
  m.mmi_weight = 0.5
  c.evals = ml_collections.ConfigDict()
  every = 100 if tiny else 1000  # both are cheap: decoding cached features
  c.evals.per = ml_collections.ConfigDict({'task': 'per', 'split': 'test', 'every': every})
  c.evals.selection = ml_collections.ConfigDict({'task': 'lm_selection', 'split': 'train',
                                                 'every': every})
  c.lock()
  return c
