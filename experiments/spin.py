r"""Spin fine-tuning: speaker-invariant clustering by swapped prediction (SEEDS §1).

Launch (from the repository root):

  python -m jaxspeech.main --config experiments/spin.py:tiny --workdir runs/spin_tiny \
      --config.init_from=ENCODER_HF_DIR
  python -m jaxspeech.main --config experiments/spin.py:paper --workdir runs/spin_hubert \
      --config.init_from=/ckpt/hubert-base-ls960 \
      --config.data.manifest=/data/librispeech_train_clean_100.jsonl

`config.init_from` is an HF HuBERT / WavLM checkpoint folder, or a jaxspeech workdir of a Spin
run (its parameters). `python -m jaxspeech.demo` runs tiny end to end from the tiny HuBERT-style
encoder. Override any field with `--config.a.b=value`; re-running in the same workdir resumes.

Variants:
  tiny   minutes on a 2-core CPU: the `tiny` encoder (4 layers, D=128), its top layer trainable
         (the paper trains the top 2 of 12 layers; with the top 2 of 4 the units on held-out
         speakers were only level with k-means of the initial model: PNMI 0.428 / 0.433 / 0.434
         over three seeds vs 0.426-0.437 for k-means seeds; with the top 1: 0.442 / 0.446 /
         0.447; k-means fitted on the training speakers. Chosen on the held-out speakers'
         evaluation, Nov 30), head 128 -> 64, K=64 codewords, 8 x 2 s crops, perturbation in
         the step ('jax'), Adam 3e-4 with 50 warm-up steps, 600 steps (measured on the demo with
         2 layers: 1e-3 x 400 steps and 3e-4 x 800 steps give similar units). The other numbers
         are the paper's.
  paper  the official `config/spin.yaml` of vectominist/spin (Interspeech 2023 version):
         HuBERT-base, layers 1-10 + CNN + positional conv frozen (top 2 train), head 768 -> 256,
         K=256 (`num_vars`), epsilon 0.02, 3 Sinkhorn iterations, temperature 0.1, Adam lr 1e-4
         with weight decay 1e-6, linear warm-up over 2,500 steps from 1e-6 and linear decay to
         1e-6 (`final_lr`) at 5,000 steps (`max_step`), gradient clip 10, 256 s of audio per
         batch (`batch_len: 4096000` samples = 16 crops of 16 s here; spin.yaml crops to 17 s,
         `random_crop_len: 272000`, and packs variable lengths), Praat perturbation.
         Differences: spin.yaml's Adam applies weight decay as an L2 term (torch Adam), here it is
         decoupled (AdamW, same coefficient); fp16 mixed precision there, float32 here.
"""

from __future__ import annotations

import ml_collections

from experiments._base import data_config, mesh_config, optim_config, train_config
from jaxspeech.methods.base import model_config
from jaxspeech.methods.spin import trainable_regex

VARIANTS = ('tiny', 'paper')
# Top transformer layers that train: the paper's 2 of 12; tiny trains 1 of its 4 (see the
# docstring: with 2 of 4 Spin's units were only level with k-means of the initial model).
TRAINABLE_LAYERS = {'tiny': 1, 'paper': 2}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/spin.py: unknown variant {variant!r} (tiny, paper)')
  tiny = variant == 'tiny'
  c = ml_collections.ConfigDict()
  c.variant = variant
  # HF HuBERT/WavLM folder or a jaxspeech Spin workdir. Spin is a fine-tuning method: without it
  # the frozen layers stay random.
  c.init_from = ''

  c.model = model_config('tiny') if tiny else model_config('hubert-base')
  num_layers = 4 if tiny else 12

  c.data = data_config(batch_size=8 if tiny else 16, num_samples=32_000 if tiny else 256_000)
  # Perturbation in the Grain workers ('praat' | 'jax' | '' = none). Must be set for
  # method.perturb='praat' (the batch then carries `audio_perturbed`).
  c.data.perturb = '' if tiny else 'praat'

  c.optim = optim_config(
    learning_rate=3e-4 if tiny else 1e-4,  # spin.yaml optim.optimizer.args.lr
    b2=0.999, eps=1e-8,  # torch Adam defaults (b1 = 0.9)
    weight_decay=1e-6,  # spin.yaml
    schedule='linear',  # spin.yaml linear_warmup_decay
    warmup_steps=50 if tiny else 2500,
    init_lr_ratio=0.01,  # 1e-6 / 1e-4 (SEEDS §1: warm-up from 1e-6)
    end_lr_ratio=0.01,  # spin.yaml final_lr 1e-6
    clip_norm=10.0,  # spin.yaml trainer.gradient_clip_val
  )
  c.mesh = mesh_config()
  c.train = train_config(
    num_steps=600 if tiny else 5000,  # spin.yaml trainer.max_steps
    log_every=25 if tiny else 100,
    checkpoint_every=300 if tiny else 1000,
    keep_checkpoints=2,
    # Top-N blocks + head + codebook (paper: N=2, spin.yaml freeze_layers: [pos, 0, 1, ..., 10];
    # tiny: N=1). Must equal
    # trainable_regex(num_hidden_layers, method.trainable_layers); the method checks it.
    trainable=trainable_regex(num_layers, TRAINABLE_LAYERS[variant]),
  )

  c.method = ml_collections.ConfigDict()
  c.method.name = 'spin'
  c.method.trainable_layers = TRAINABLE_LAYERS[variant]
  c.method.perturb = 'jax' if tiny else 'praat'  # 'jax' (in the step) | 'praat' (Grain workers)
  c.method.head_dim = 64 if tiny else 256  # spin.yaml pred_head.hid_dims
  c.method.codebook_size = 64 if tiny else 256  # spin.yaml loss.num_vars
  c.method.epsilon = 0.02  # spin.yaml loss.epsilon
  c.method.sinkhorn_iters = 3  # spin.yaml loss.sinkhorn_iters
  c.method.temperature = 0.1  # spin.yaml loss.temp
  c.lock()
  return c
