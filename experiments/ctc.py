r"""CTC fine-tuning of a pretrained encoder (phones or characters), optionally pruned.

Launch (from the repository root). `prune_runner` converts a pretraining workdir (e.g. HuBERT's)
or an HF checkpoint into this model's initial parameters, runs every phase a pruning method
needs and writes `sparsity.json`:

  python -m jaxspeech.prune --config experiments/ctc.py:tiny \
      --workdir runs/ctc_tiny --config.init_from=runs/hubert_tiny
  python -m jaxspeech.evaluate --task ctc --checkpoint runs/ctc_tiny \
      --manifest ~/.cache/jaxspeech/synth-400-0/manifest.jsonl --split test

`python -m jaxspeech.main --config experiments/ctc.py:tiny --workdir W` also trains (one run,
no `sparsity.json`; `init_from` = another method's workdir gives its encoder only, the trainer's
rule).

Variants:
  tiny        phone CTC on the built-in synthetic corpus (train split; `us2_high`, `en1_high`
              held out as `test`), the `tiny` encoder, whole utterances padded to 3.75 s
              (the corpus's longest is 3.73 s), batch 8, 400 updates (lr 1e-3), transformer
              frozen for the first 100.
  FSDD digit words: `tiny` with `--config.data.manifest=M --config.method.unit=char
              --config.data.num_samples=16000` (1 s: longer digits are left out of the loss);
              `benchmarks/parp_sweep.py` writes M with one held-out speaker.
  paper_10m / paper_1h / paper_10h (`paper` = paper_10m)
              wav2vec 2.0 BASE fine-tuning on LibriSpeech 10 min / 1 h / 10 h, values from
              fairseq `examples/wav2vec/config/finetuning/base_{10m,1h,10h}.yaml` (read at
              commit 5856cd1f): Adam lr 5e-5, betas (0.9, 0.98), eps 1e-8, no weight decay, no
              clipping; tri-stage schedule, phases 0.1/0.4/0.5, final lr scale 0.05 (fairseq's
              default initial scale 0.01); 13k/13k/20k updates; transformer frozen for the first
              10k (`freeze_finetune_updates`); conv feature extractor frozen
              (`feature_grad_mult 0`); time masks p=0.65 (span 10); activation dropout 0.1;
              letter targets; 2 GPUs x 3.2M samples x update_freq 4 = 25.6M samples per update,
              here 48 utterances padded to 35 s (static shapes). Not reproduced: channel masking
              (p 0.25/0.25/0.5, length 64), layerdrop (0.1/0.1/0.05), fairseq's
              length-bucketed batches.
  PARP: `prune.method=parp`, `prune.every` = 50 updates (our default; the paper's interval is
  not verified here), sparsity 0.5-0.9.
"""

from __future__ import annotations

import ml_collections

from experiments._base import data_config, mesh_config, optim_config, train_config
from jaxspeech.methods.base import model_config
from jaxspeech.methods.parp import prune_config

VARIANTS = ('tiny', 'paper', 'paper_10m', 'paper_1h', 'paper_10h')
# fairseq base_{10m,1h,10h}.yaml: (max_update, mask_channel_prob, layerdrop)
_PAPER = {'paper_10m': (13_000, 0.25, 0.1), 'paper_1h': (13_000, 0.25, 0.1),
          'paper_10h': (20_000, 0.5, 0.05)}
FREEZE_FEATURE_EXTRACTOR = r'^(?!encoder/feature_extractor/)'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/ctc.py: unknown variant {variant!r} {VARIANTS}')
  if variant == 'paper':
    variant = 'paper_10m'
  paper = variant.startswith('paper')
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''  # HF dir or CTC workdir (main); prune_runner also takes pretraining workdirs

  c.model = model_config('tiny') if not paper else model_config(
    'wav2vec2-base', activation_dropout=0.1)

  c.data = data_config(
    batch_size=48 if paper else 8,
    # Whole utterances: longer ones would be cropped and are left out of the loss.
    num_samples=560_000 if paper else 60_000,
  )
  c.optim = optim_config(
    learning_rate=5e-5 if paper else 1e-3,
    eps=1e-8,
    weight_decay=0.0,
    schedule='tri_stage' if paper else 'linear',
    warmup_steps=0 if paper else 40,
    init_lr_ratio=0.01 if paper else 0.0,
    end_lr_ratio=0.05 if paper else 0.0,
    clip_norm=0.0 if paper else 10.0,
  )
  c.mesh = mesh_config()
  c.train = train_config(
    num_steps=_PAPER[variant][0] if paper else 400,
    log_every=200 if paper else 50,
    checkpoint_every=1000 if paper else 400,
    keep_checkpoints=2,
    trainable=FREEZE_FEATURE_EXTRACTOR,  # fairseq feature_grad_mult 0.0
  )

  c.method = ml_collections.ConfigDict()
  c.method.name = 'ctc'
  c.method.unit = 'char' if paper else 'phone'
  # tiny: no time masks (untested at this size) and the transformer frozen for the first 100
  # updates: with it trainable from the start (lr 1e-3, from HuBERT tiny or from scratch) the
  # encoder collapsed to one output for every frame and CTC stayed all-blank (measured on FSDD:
  # 2.9 nats/char after 300 updates); frozen first, 400 updates reach 0.48 nats/char.
  c.method.mask_prob = 0.65 if paper else 0.0
  c.method.mask_length = 10
  c.method.freeze_encoder_steps = 10_000 if paper else 100

  c.prune = prune_config()
  c.lock()
  return c
