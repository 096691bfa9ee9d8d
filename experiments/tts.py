r"""FastSpeech-2-style acoustic model (phones + speaker -> 80-bin log-mel; `jaxspeech.methods.tts`).

  python -m jaxspeech.main --config experiments/tts.py:tiny --workdir runs/tts_tiny
  python -m jaxspeech.synthesize --checkpoint runs/tts_tiny --vocoder runs/vocoder_tiny \
      --text "The old man saw a bird." --speaker us1 --out samples/
  python -m jaxspeech.evaluate --checkpoint runs/tts_tiny --task tts --judge runs/judge_tiny

Pruning (`config.prune`, the PARP machinery): one-shot magnitude pruning of the trained model,
then fine-tuning with the masks fixed:

  python -m jaxspeech.main --config experiments/tts.py:finetune --workdir runs/tts_s50 \
      --config.init_from=runs/tts_tiny --config.prune.method=mpi --config.prune.sparsity=0.5

Variants:
  tiny      the built-in corpus (1,600 utterances; the 6 training voices' 1,200), whole
            utterances (buckets 2 / 3 / 3.75 s), peak-normalised audio (the vocoder's scaling);
            width 128, 3 + 3 FFT blocks (2 heads, conv FFN 256, kernel 3: CPU-sized),
            dropout 0.1; batch 16,
            AdamW 1e-3, 2,000 updates.
  finetune  `tiny`'s model, 1,000 updates at lr 3e-4: the fine-tuning phase of a pruned (or
            TTS-augmented) model, `init_from` the dense workdir.
  paper     FastSpeech 2 as in its public implementations (ming024/FastSpeech2 LJSpeech
            config: width 256, 4 encoder + 6 decoder blocks, 2 heads, conv FFN 1024 (kernels 9),
            dropout 0.2, batch 16, Adam (0.9, 0.98) eps 1e-9, warm-up 4,000, 900k updates). Needs
            a manifest whose rows have `alignment` (e.g. from the Montreal Forced Aligner) at
            `config.data.manifest`; no pitch/energy predictors (see the method).
"""

from __future__ import annotations

import ml_collections

from experiments import _base
from jaxspeech.methods.prune_spec import prune_config
from jaxspeech.methods.tts import PRUNE_PATTERN

VARIANTS = ('tiny', 'finetune', 'paper')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/tts.py: unknown variant {variant!r} {VARIANTS}')
  paper = variant == 'paper'
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''
  c.model = ml_collections.ConfigDict()  # sizes are method fields (no speech encoder)
  c.data = _base.data_config(
    batch_size=16,
    builtin_utterances=1600,
    num_samples=60_000 if not paper else 16_000 * 12,
    bucket_lengths=(32_000, 48_000, 60_000) if not paper else (),
    normalize='peak',
  )
  c.optim = _base.optim_config(
    learning_rate={'tiny': 1e-3, 'finetune': 3e-4, 'paper': 1e-3}[variant],
    b2=0.98, eps=1e-9, weight_decay=0.0 if paper else 1e-6,
    schedule='linear' if not paper else 'cosine',
    warmup_steps={'tiny': 200, 'finetune': 50, 'paper': 4000}[variant],
    clip_norm=1.0,
  )
  c.mesh = _base.mesh_config()
  c.train = _base.train_config(
    num_steps={'tiny': 2000, 'finetune': 1000, 'paper': 900_000}[variant],
    log_every=100, checkpoint_every=1000 if not paper else 10_000)
  c.method = ml_collections.ConfigDict()
  c.method.name = 'tts'
  c.method.max_phones = 48 if not paper else 256
  c.method.dim = 256 if paper else 128
  c.method.heads = 2
  c.method.ffn_dim = 1024 if paper else 256
  c.method.ffn_kernel = 9 if paper else 3
  c.method.encoder_layers = 4 if paper else 3
  c.method.decoder_layers = 6 if paper else 3
  c.method.predictor_dim = 256 if paper else 128
  c.method.dropout = 0.2 if paper else 0.1
  c.method.duration_weight = 1.0
  # Distillation from the starting model (with init_from = the dense workdir: the dense model's
  # teacher-forced mel as a second target); 0 = off.
  c.method.distill_weight = 0.0
  c.prune = prune_config(pattern=PRUNE_PATTERN)
  c.lock()
  return c
