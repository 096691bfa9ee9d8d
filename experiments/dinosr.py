r"""DinoSR pretraining: masked prediction of an EMA teacher's online-clustered top layers.

Launch (from the repository root):

  python -m jaxspeech.main --config experiments/dinosr.py:tiny --workdir runs/dinosr_tiny
  python -m jaxspeech.main --config experiments/dinosr.py:paper --workdir runs/dinosr_base \
      --config.data.manifest=/data/librispeech960.jsonl --config.mesh.shape.data=-1

Override any field with `--config.a.b=value`. Running the same command again in the same workdir
resumes from its latest checkpoint.

Variants:
  tiny   ~8 minutes on a quiet 2-core CPU: the `tiny` encoder (4 layers, D=128) on the built-in
         synthetic corpus, 1 s crops, 2000 steps, top 3 layers with V=64 codewords each, and a
         faster teacher (decay 0.99 -> 0.999 over the 2000 steps) because the run is short.
         The reference's mechanics as `paper` (issue 15): fairseq span masking, teacher `pos_conv`
         copied from the student, no dead-codeword restart, units evaluated on 1 s windows. The
         runs in the README before issue 15 used exact 56.6% masking, an EMA'd `pos_conv`,
         restart patience 10 (with the reference init and update alone only ~20% of the 64
         codewords had been used) and whole-utterance units: `benchmarks/dinosr_ablation.py`
         measures each change.
  paper  DinoSR base, official `config/base.yaml` (Liu et al., 2023; SEEDS §2): 12-layer base
         encoder with a layer-norm CNN extractor, data2vec's 5-conv positional stack (kernel 19)
         and layerdrop 0.05, top 8 layers, V=256 codewords, codebook decay 0.9, teacher decay
         0.999 -> 0.9999 linearly over 30k updates, teacher frozen at 200k, 400k updates, Adam
         5e-4 (betas 0.9/0.98, eps 1e-6, weight decay 0.01), tri-stage schedule 3%/47%/50%, mask
         p=0.8 span 10 drawn as fairseq's `compute_mask_indices` (require_same_masks), teacher
         EMA without `pos_conv` (ema_layers_only), dropout 0.1 (none on the input features:
         dropout_input 0.0). Batch as in data2vec/DinoSR base (16 GPUs x 3.8 M samples = ~243
         crops of 250k samples); fairseq's variable-length batching (2-20 s crops) is not
         reproduced, and require_same_masks cuts to the minimum over the global batch (fairseq:
         per GPU). Clip norm (fairseq: none) and weight decay on >= 2-D parameters only
         (fairseq: all) differ; batch size is unverified.
"""

from __future__ import annotations

import ml_collections

from experiments._base import data_config, mesh_config, optim_config, train_config
from jaxspeech.methods.base import model_config

VARIANTS = ('tiny', 'paper')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/dinosr.py: unknown variant {variant!r} (tiny, paper)')
  tiny = variant == 'tiny'
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''  # jaxspeech workdir or HF checkpoint folder; '' = from scratch

  c.model = model_config('tiny') if tiny else model_config(
    'hubert-base', hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
    feat_proj_dropout=0.0,  # base.yaml dropout_input: 0.0
    # base.yaml: extractor_mode layer_norm, encoder_layerdrop 0.05, data2vec's positional stack
    # pos_conv_depth 5 with conv_pos 95 -> kernel 95 // 5 = 19 per conv (fairseq wav2vec2.py).
    feat_extract_norm='layer', layerdrop=0.05, pos_conv_depth=5, num_conv_pos_embeddings=19)

  c.data = data_config(batch_size=8 if tiny else 240, num_samples=16000 if tiny else 250_000)
  c.optim = optim_config(
    learning_rate=1e-3 if tiny else 5e-4,
    schedule='linear' if tiny else 'tri_stage',
    warmup_steps=50 if tiny else 32_000,
    init_lr_ratio=0.0 if tiny else 0.01,
    end_lr_ratio=0.0 if tiny else 0.01,
    tri_stage_ratios=(0.03, 0.47, 0.50),  # base.yaml lr_scheduler.phase_ratio
  )
  c.mesh = mesh_config()
  c.train = train_config(
    num_steps=2000 if tiny else 400_000,
    log_every=25 if tiny else 200,
    checkpoint_every=500 if tiny else 5000,
    keep_checkpoints=2 if tiny else 5,
  )

  c.method = ml_collections.ConfigDict()
  c.method.name = 'dinosr'
  c.method.average_top_k_layers = 3 if tiny else 8
  # Each target layer's FFN output before the residual add (DinoSR's `layer_results`); 'block' =
  # the block output (hidden state).
  c.method.target_output = 'ffn'
  c.method.codebook_size = 64 if tiny else 256
  c.method.codebook_decay = 0.9
  c.method.ema_decay = 0.99 if tiny else 0.999
  c.method.ema_end_decay = 0.999 if tiny else 0.9999
  c.method.ema_anneal_end_step = 2000 if tiny else 30_000
  c.method.freeze_teacher_step = 0 if tiny else 200_000  # 0 = never freeze
  c.method.mask_prob = 0.8  # base.yaml
  c.method.mask_length = 10
  # 'fairseq': `data_utils.compute_mask_indices` as DinoSR calls it (min_masks 1,
  # require_same_masks); 'exact' = a fixed 56.6% of the frames (the runs before issue 15).
  c.method.mask_style = 'fairseq'
  # Teacher parameters copied from the student instead of EMA'd (path substrings): DinoSR's
  # `ema_layers_only` skips the positional conv; () = EMA everything (before issue 15).
  c.method.ema_skip = ('pos_conv',)
  # `--codebook` units on consecutive windows of this many samples, as the training crops:
  # -1 = the training crop (config.data.num_samples, or the longest of bucket_lengths),
  # 0 = whole utterances (before issue 15).
  c.method.eval_window_samples = -1
  # DinoSR's default codebook init; 'normal' = its `normal_init_codebook` option, N(0, 1/V).
  c.method.codebook_init = 'instance_norm'
  # Dead-codeword restart (not in DinoSR): a codeword unused for this many steps is reset to a
  # random selected target frame; 0 = off (the reference; tiny used 10 before issue 15).
  c.method.codebook_restart_patience = 0
  c.lock()
  return c
