r"""HiFi-GAN vocoder: log-mel (`jaxspeech.ops.mel`, 16 kHz, hop 256, 80 bins) -> waveform.

  python -m jaxspeech.main --config experiments/vocoder.py:tiny --workdir runs/vocoder_tiny
  python -m benchmarks.vocoder_copy_synthesis --workdir runs/vocoder_tiny --num 20  # vs G-L

A GAN of two parameter groups in the one train step (`jaxspeech/methods/vocoder.py`): the
generator (`config.optim.generator`) and the multi-period + multi-scale discriminators
(`config.optim.discriminator`), both updated every step. Batches are random crops of
`config.data.num_samples` samples (a multiple of the hop), peak-normalised to 0.95 as HiFi-GAN
(`config.data.normalize = 'peak'`); the mel is computed from the crop inside the step.

Optimizer (hifi-gan `config_v1.json`, `train.py`): AdamW lr 2e-4, betas (0.8, 0.99), eps 1e-8,
weight decay 0.01 (torch AdamW's default, which the reference keeps), no clipping; the learning
rate decays exponentially by 0.999 per epoch (torch ExponentialLR stepped per epoch). Here it is
the optimizer's `tri_stage` schedule with no warm-up and no hold (ratios (0, 0, 1)): a smooth
exponential decay from lr to `end_lr_ratio * lr` over `train.num_steps`, with `end_lr_ratio` =
0.999 ** (num_steps / steps per epoch).

Variants:
  paper  HiFi-GAN V1 at 16 kHz: upsampling (8, 8, 2, 2) with kernels (16, 16, 4, 4) from 512
         channels, ResBlock1 kernels (3, 7, 11) x dilations (1, 3, 5); MPD periods 2, 3, 5, 7,
         11 (32-128-512-1024-1024 channels), 3-scale MSD (128 ... 1024, groups up to 16);
         batch 16 of 8192-sample segments, 2.5 M steps, loss weights adv 1, fm 2, mel 45, no
         MR-STFT term (HiFi-GAN's own loss); epoch = 810 steps (LJSpeech's 12,950 training
         clips / 16) for the decay. Multi-GPU scale; never run here.
  tiny   <= 20 min on a 2-core CPU shared with other jobs (measured Dec 2: 1,600 steps in 12.8
         min wall, compilation included; 1.6-2.7 steps/s as the other jobs came and went; the
         bare step took 0.37 s at batch 4 and 1.2 s at batch 8, hence batch 4): upsampling
         (8, 8, 4) from 64 channels (32 -> 16 -> 8), ResBlock1 kernels (3, 7) x dilations
         (1, 3, 5); discriminators at 1/4 to 1/32 of the paper's widths, MSD ungrouped with
         11-tap convs; batch 4 of 8192-sample segments (0.5 s) of the built-in corpus (1,600
         utterances, split 'train'), 1,600 steps; MR-STFT weight 1 on top of HiFi-GAN's loss;
         for the first `adv_start_step` = 600 steps the generator learns from the mel +
         MR-STFT terms only, then the full GAN. At this length the generator is far from
         converged (copy synthesis on 20 held-out utterances: log-mel L1 1.05 vs Griffin-Lim's
         0.15, `benchmarks/vocoder_copy_synthesis.py`); it exercises the recipe, not the quality.
"""

from __future__ import annotations

import ml_collections

from experiments import _base
from jaxspeech.methods.prune_spec import prune_config

GENERATOR_PRUNE_PATTERN = r'^generator/.*kernel$'

VARIANTS = ('tiny', 'paper')


def _adamw(num_steps: int, steps_per_epoch: int) -> ml_collections.ConfigDict:
  c = _base.optim_config(name='adamw', learning_rate=2e-4, b1=0.8, b2=0.99, eps=1e-8,
                         weight_decay=0.01, schedule='tri_stage', warmup_steps=0,
                         tri_stage_ratios=(0.0, 0.0, 1.0),
                         end_lr_ratio=0.999 ** (num_steps / steps_per_epoch), clip_norm=0.0)
  c.every, c.phase = 1, 0  # both groups every step (HiFi-GAN: D step then G step per batch)
  c.frozen = ''
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/vocoder.py: unknown variant {variant!r} (tiny, paper)')
  tiny = variant == 'tiny'
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''
  c.model = ml_collections.ConfigDict()  # sizes are method fields (no speech encoder)
  batch = 4 if tiny else 16
  c.data = _base.data_config(batch_size=batch, num_samples=8192, normalize='peak',
                             builtin_utterances=1600, split='train')
  num_steps = 1600 if tiny else 2_500_000
  # Steps per epoch for the per-epoch decay: the built-in corpus's ~1,200 training utterances
  # per batch (tiny); LJSpeech's (paper).
  steps_per_epoch = 1200 // batch if tiny else 810
  c.optim = ml_collections.ConfigDict({'generator': _adamw(num_steps, steps_per_epoch),
                                       'discriminator': _adamw(num_steps, steps_per_epoch)})
  c.mesh = _base.mesh_config()
  c.train = _base.train_config(num_steps=num_steps, log_every=50 if tiny else 1000,
                               checkpoint_every=500 if tiny else 50_000)
  m = c.method = ml_collections.ConfigDict()
  m.name = 'vocoder'
  # Generator (hifi-gan config_v1.json; tiny: a CPU-size V1).
  m.n_mels = 80
  m.channels = 64 if tiny else 512
  m.upsample_rates = (8, 8, 4) if tiny else (8, 8, 2, 2)  # product = hop 256
  m.upsample_kernels = ()  # () = 2 x rate: (16, 16, 8) / (16, 16, 4, 4)
  m.resblock_kernels = (3, 7) if tiny else (3, 7, 11)
  m.resblock_dilations = ((1, 3, 5),) * len(m.resblock_kernels)
  # Discriminators.
  m.mpd_periods = (2, 3, 5, 7, 11)
  m.mpd_channels = (8, 16, 32, 32, 32) if tiny else (32, 128, 512, 1024, 1024)
  m.msd_scales = 3
  m.msd_channels = (16, 16, 32, 32, 32, 32, 32) if tiny else (128, 128, 256, 512, 1024, 1024,
                                                               1024)
  # tiny: ungrouped 11-tap convs (grouped / 41-tap ones are ~20x slower per FLOP on XLA:CPU).
  m.msd_groups = (1,) * 7 if tiny else (1, 4, 16, 16, 16, 16, 1)
  m.msd_kernels = (15, 11, 11, 11, 11, 11, 5) if tiny else (15, 41, 41, 41, 41, 41, 5)
  m.msd_strides = (1, 2, 2, 4, 4, 1, 1)
  # Loss weights (hifi-gan train.py: fm x2, mel x45) and the MR-STFT option.
  m.adv_weight = 1.0
  m.fm_weight = 2.0
  m.mel_weight = 45.0
  m.mrstft_weight = 1.0 if tiny else 0.0
  m.mrstft_resolutions = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))  # PWG
  m.adv_start_step = 600 if tiny else 0
  c.evals = ml_collections.ConfigDict()
  # Magnitude pruning of the generator's conv kernels (none by default): one-shot
  # `--config.prune.method=mpi --config.prune.sparsity=S --config.init_from=DENSE_VOCODER
  # --config.method.adv_start_step=0` prunes the trained generator and fine-tunes it (GAN on).
  c.prune = prune_config(pattern=GENERATOR_PRUNE_PATTERN)
  c.lock()
  return c
