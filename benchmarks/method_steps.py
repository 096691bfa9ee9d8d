r"""Train-step time of each method and the share of it spent in the method's own operations.

  python -m benchmarks.method_steps [--quick] [--methods spin,dinosr,hubert,parp] [--out r.json]

For every method: the real jitted train step (`benchmarks.train_step`: `step_lib.build_setup`,
`jit_train_step`, compiled ahead of time; same code path as training) of
`experiments/<method>.py:paper` (base size; `tiny` with --quick) on a small random batch (2 x 4 s;
2 x 1 s with --quick) is timed, then each of the method's own operations alone, jitted, on
inputs of the shapes the step gives them (its parameters, codebooks and masks are the step's
state itself):

  spin    Sinkhorn targets + swapped-prediction loss, forward and backward w.r.t. the head outputs
          `[2B, T, E]` and the codebook `[K, E]`, then the codebook row renormalisation
          (`ops.swapped_prediction.spin_loss`, `normalize_codebook`).
  dinosr  span mask + instance norm of the top-K teacher layers + nearest codeword + EMA codebook
          update (+ dead-codeword restart when configured) (`methods.dinosr.dinosr_targets`,
          `assign_and_update`, `ops.codebook`, `ops.masking`); and, separately, the EMA teacher
          update (`ops.distillation.ema_update`) over the transformer's parameters.
  hubert  span mask; MFCC k-means targets (`HubertPretraining.targets`); the cosine logits vs the
          label embeddings (`final_proj` included) + cross-entropy, forward and backward.
  parp    applying the magnitude masks to the parameters (per step) and the re-prune
          (`PruneSpec.masks` + `apply_masks`) amortised over `prune.every` updates. Its
          step is CTC fine-tuning with the transformer trainable, on 2 x 4 s also with --quick
          (CTC leaves out utterances that do not fit whole).

share = (sum of the components' median times) / (median step time). Separately jitted components
lose the fusion they get inside the step, so the share is an upper bound. Issue target: <= 3%.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

METHODS = ('spin', 'dinosr', 'hubert', 'parp')
TARGET_SHARE = 0.03


def _step_args(name: str, quick: bool, variant: str = '', num_samples: int = 0) -> dict:
  """Variant, batch and config overrides of a method's step benchmark."""
  kw = {'variant': variant or ('tiny' if quick else 'paper'), 'batch_size': 2,
        'num_samples': num_samples or (16000 if quick else 64000), 'overrides': {},
        'extra_fields': None}
  if name == 'parp':
    # Time the step of the fine-tuning proper: the transformer trainable (not frozen for the
    # first updates) and CTC labels (random ids, half the longest label sequence) in the batch.
    kw['overrides'] = {'method.freeze_encoder_steps': 0}
    # CTC needs utterances that fit whole (the built-in corpus's are 1.5-3.7 s).
    kw['num_samples'] = 64000
    kw['extra_fields'] = _ctc_labels
  return kw


def _ctc_labels(b: int, s: int, spec: dict) -> dict:
  """Random CTC labels for the batch spec's `labels` [B, U] (ids 1..9) and lengths U // 2."""
  del s
  u = spec['labels'].shape[1]
  rng = np.random.default_rng(0)
  return {'labels': rng.integers(1, 10, (b, u)).astype(np.int32),
          'label_length': np.full((b,), max(u // 2, 1), np.int32),
          'index': np.arange(b, dtype=np.int32)}


def method_ops(name: str, kept: dict) -> dict:
  """{component: (jitted fn, args, weight)}: the method's own ops on the step's shapes; a
  component's time counts `weight` times per step (1/every for PARP's re-prune)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  setup, state, config = kept['setup'], kept['state'], kept['config']
  method, m = setup.method, config.method
  b, s = int(config.data.batch_size), int(config.data.num_samples)
  t = method.enc_cfg.num_frames(s)
  d = method.enc_cfg.hidden_size
  key = jax.random.key(0)
  frame_mask = jnp.ones((b, t), bool)  # [B, T]
  params = state['params']

  if name == 'spin':
    from jaxspeech.ops import swapped_prediction as sp

    z = jax.random.normal(key, (2 * b, t, int(m.head_dim)), jnp.float32)  # [2B, T, E]

    def spin_ops(z, codebook, mask):
      def loss(z, c):
        return sp.spin_loss(z[:b], z[b:], c, mask, float(m.epsilon), int(m.sinkhorn_iters),
                            float(m.temperature)).loss

      value, (gz, gc) = jax.value_and_grad(loss, argnums=(0, 1))(z, codebook)
      return value, gz, sp.normalize_codebook(codebook - gc)

    return {'sinkhorn+swapped_loss fwd/bwd+renorm':
            (jax.jit(spin_ops), (z, params['codebook'], frame_mask), 1.0)}

  if name == 'dinosr':
    from jaxspeech.methods import dinosr
    from jaxspeech.ops import codebook as cb
    from jaxspeech.ops import distillation, masking

    k = method.k
    hidden = tuple(jax.random.normal(jax.random.fold_in(key, i), (b, t, d), jnp.float32)
                   for i in range(k))  # K x [B, T, D]
    extra = state['extra']
    idle = extra.get('codebook_idle', jnp.zeros((k, method.v), jnp.int32))
    patience = method.restart_patience

    def targets_codebook(key, hidden, mask, codebooks, idle):
      masked = masking.span_mask(key, mask, float(m.mask_prob), int(m.mask_length))
      targets = dinosr.dinosr_targets(hidden, mask, k)  # [K, B, T, D]
      select = masked & mask
      codes, codebooks = dinosr.assign_and_update(codebooks, targets, select,
                                                  float(m.codebook_decay))
      if patience > 0:
        codebooks, idle = jax.vmap(
          lambda st, i, y, c, kk: cb.restart_dead_codewords(st, i, y, c, select, kk, patience))(
          codebooks, idle, targets, codes, jax.random.split(key, k))
      return codes, codebooks, idle

    def teacher_ema(teacher, student, decay):
      return distillation.ema_update(teacher, student, decay)

    student = params
    for p in dinosr.TRANSFORMER_PATH:
      student = student[p]
    decay = jnp.asarray(method.teacher_decay(jnp.zeros((), jnp.int32)), jnp.float32)
    return {
      'span_mask+instance_norm+codebook': (
        jax.jit(targets_codebook), (key, hidden, frame_mask, extra['codebooks'], idle), 1.0),
      'teacher_ema': (jax.jit(teacher_ema), (extra['teacher'], student, decay), 1.0),
    }

  if name == 'hubert':
    from jaxspeech.ops import masking

    wav = kept['batch']['audio']
    kmeans = state['extra']['kmeans']
    h = jax.random.normal(key, (b, t, d), jnp.float32)  # [B, T, D] last hidden state
    targets = jnp.zeros((b, t), jnp.int32)
    graphdef, model_state = setup.graphdef, state['model_state']
    head_keys = [k for k in ('final_proj', 'label_embs') if k in params]

    def head_loss(params, h, targets, mask):
      def loss(head, h):
        model = nnx.merge(graphdef, {**params, **head}, model_state)
        logits = model.logits(h, float(m.logit_temp))  # [B, T, K]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
        sel = mask.astype(jnp.float32)
        return jnp.sum(ce * sel) / jnp.maximum(jnp.sum(sel), 1.0)

      return jax.value_and_grad(loss, argnums=(0, 1))({k: params[k] for k in head_keys}, h)

    span = jax.jit(lambda key, mask: masking.span_mask(key, mask, float(m.mask_prob),
                                                       int(m.mask_length)))
    return {
      'span_mask': (span, (key, frame_mask), 1.0),
      'mfcc_kmeans_targets': (jax.jit(method.targets), (kmeans, wav), 1.0),
      'cosine_logits+ce fwd/bwd': (jax.jit(head_loss), (params, h, targets, frame_mask), 1.0),
    }

  if name == 'parp':
    from jaxspeech.ops import pruning

    spec = method.prune
    masks = state['extra']['prune']['masks']

    def reprune(p):
      mk = spec.masks(p)
      return pruning.apply_masks(p, mk), mk

    return {
      'apply_masks': (jax.jit(pruning.apply_masks), (params, masks), 1.0),
      f'reprune/{spec.every}': (jax.jit(reprune), (params,), 1.0 / spec.every),
    }

  raise ValueError(f'unknown method {name!r}; one of {METHODS}')


def bench_method(name: str, quick: bool, steps: int, repeats: int, variant: str = '',
                 num_samples: int = 0) -> dict:
  import jax

  from benchmarks import train_step
  from benchmarks.encoder_step import median_time

  kw = _step_args(name, quick, variant, num_samples)
  kept: dict = {}
  step = train_step.benchmark(name, kw['variant'], kw['batch_size'], kw['num_samples'], steps,
                              overrides=kw['overrides'], extra_fields=kw['extra_fields'],
                              keep=kept)
  comps = {}
  ops_s = 0.0
  for comp, (fn, args, weight) in method_ops(name, kept).items():
    med, _ = median_time(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)), repeats)
    comps[comp] = {'median_s': med, 'per_step_weight': weight, 'per_step_s': med * weight}
    ops_s += med * weight
  share = ops_s / step['step_s_median']
  return {**step, 'ops_s': ops_s, 'share': share, 'components': comps,
          'target_share': TARGET_SHARE, 'meets_target': bool(share <= TARGET_SHARE)}


def run(quick: bool, methods=METHODS, steps: int | None = None, repeats: int | None = None,
        variant: str = '', num_samples: int = 0) -> dict:
  steps = steps or (3 if quick else 5)
  repeats = repeats or (3 if quick else 5)
  res = {}
  for name in methods:
    res[name] = r = bench_method(name, quick, steps, repeats, variant, num_samples)
    print(f"# method {name}: step {r['step_s_median']:.3f} s, own ops {r['ops_s'] * 1e3:.2f} ms "
          f"({r['share']:.1%})", flush=True)
  return res


def table(res: dict) -> str:
  out = ['| method (config, B x S) | step (median) | own ops | share | ops components (ms) |',
         '|---|---|---|---|---|']
  for name, r in res.items():
    b, s = r['batch']
    comps = ', '.join(f"{k} {v['per_step_s'] * 1e3:.2f}" for k, v in r['components'].items())
    out.append(f"| {name} ({r['config']}, {b} x {s / 16000:g} s) | {r['step_s_median']:.3f} s | "
               f"{r['ops_s'] * 1e3:.2f} ms | {r['share']:.1%} | {comps} |")
  return '\n'.join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true')
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--variant', default='', help='experiment variant (default: paper; quick: tiny)')
  p.add_argument('--num_samples', type=int, default=0, help='samples per utterance (0: default)')
  p.add_argument('--steps', type=int, default=0, help='timed steps (0: 5; quick: 3)')
  p.add_argument('--repeats', type=int, default=0, help='timed op repeats (0: 5; quick: 3)')
  p.add_argument('--out')
  args = p.parse_args(argv)
  res = run(args.quick, args.methods.split(','), args.steps or None, args.repeats or None,
            args.variant, args.num_samples)
  print(table(res))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
