"""DinoSR: masked prediction with self-distillation and online clustering (Liu et al., 2023).

Reference: Alexander-H-Liu/dinosr `models/dinosr.py`, `config/base.yaml` (SEEDS §2).

* Student: CNN -> LN -> projection -> span mask (p=0.8 of start frames, span 10, masked frames
  replaced by the encoder's learned `masked_spec_embed`) -> transformer. `config.method.mask_style`
  (`jaxspeech.ops.masking.span_mask`): 'fairseq' is the reference's `compute_mask_indices`
  (random span count, overlapping spans, every row cut to the batch's smallest masked count: ~43%
  of 8 x 49-frame crops at p=0.8); 'exact' (workdirs without the key) masks a fixed 56.6%.
* Teacher: an EMA copy of the **transformer only** (`extra_state['teacher']`, a pure dict shaped
  like the student's `encoder/encoder` parameters), run in eval mode on the **unmasked** projected
  features of the shared CNN/projection (before feature-projection dropout, as DinoSR's
  `pre_encoder_features`), without gradient. Updated after every optimizer step (`post_update`)
  with the linear decay schedule (`ema_decay_schedule`: 0.999 -> 0.9999 over 30k updates, frozen
  from 200k). Parameters whose path (e.g. `pos_conv_embed/weight_v`) contains one of the
  substrings of `config.method.ema_skip` are copied from the student instead while the decay is
  below 1: DinoSR's `ema_layers_only` skips `pos_conv` (fairseq `EMAModule(skip_keys=...)`); ()
  (workdirs without the key) averages everything.
* Targets: the teacher's top K block outputs, each instance-normalised over the valid frames of
  its utterance (`instance_norm_over_time`). Layer k has an online codebook (running sums S_k and
  counts n_k, `extra_state['codebooks']`, stacked `[K, V, D]` / `[K, V]`); the target unit is the
  nearest codeword, a = argmin_v ||y - S_v / n_v||^2. The codebooks are updated from the masked
  frames of the batch (sums over the global batch: plain reductions of the global arrays under
  jit), with decay tau=0.9 and only for codewords that were used (`codebook_update`).
* Loss: one linear head W_k per target layer on the student's last hidden state; cross-entropy
  over masked valid frames, averaged over frames and then over the K layers.

Options beyond the reference (`config.method`): `codebook_init='normal'` (DinoSR's
`normal_init_codebook`) and `codebook_restart_patience > 0` (default 0, off as in DinoSR),
dead-codeword restart (`codebook.restart_dead_codewords`, idle counters in
`extra_state['codebook_idle']`): without it the tiny run used only ~20% of its codewords, those
that lost the first assignments never being updated again; it keeps moving the targets.

Targets (`config.method.target_output`): `'ffn'` (the configs' value) is DinoSR's, after
data2vec: each target layer's feed-forward output before the residual add and the final LayerNorm
(`TransformerBlock(return_ffn=True)`); `'block'` takes the block output (`hidden_states`) instead,
the only choice before Nov 29 (workdirs without the key). On the tiny run, block-output targets
made units that encode the distance to the utterance edge more than the phone (see README).

Metrics: `acc_masked` (mean over layers of the head's accuracy at masked frames, chance is about
1/V), `loss_layer_k`, `codebook_ppl_k` / `codebook_used_k` (perplexity and fraction of codewords
used by this batch's targets of layer k, DinoSR's `target_ppl`), `pred_ppl` (perplexity of the
heads' mean predicted distribution).

Predictions (`predict_fns`): 'features' of the student's encoder; 'units' of a target layer, the
loss's own assignment (`codebook_units_fn`: the teacher's transformer, instance norm, nearest
codeword of that layer's codebook). Training sees crops (instance norm and positional conv edges
over `config.data.num_samples`), so with `config.method.eval_window_samples` the units are
computed on consecutive windows of that many samples (-1 = the training crop:
`config.data.num_samples` or the longest of `bucket_lengths`, the configs' value; 0 = whole
utterances, workdirs without the key), frame-aligned so that the windows' frames are exactly the
utterance's frames (`windowed_units`).

Legend: B batch, S samples, T frames (50 Hz), D width, K target layers, V codewords per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxspeech.errors import ConfigError
from jaxspeech.layers.attention import dense
from jaxspeech.layers.partitioning import EMBED, VOCAB
from jaxspeech.methods.base import Method, bucket_lengths, encoder_config
from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder
from jaxspeech.ops import codebook as cb
from jaxspeech.ops import distillation, masking, pruning

# Where the transformer's parameters sit in the pure-dict parameter tree of `DinosrModel`.
TRANSFORMER_PATH = ('encoder', 'encoder')
# `config.method.codebook_init`: DinoSR's default (randn instance-normalised over codewords) and
# its `normal_init_codebook` option (N(0, 1/V)).
CODEBOOK_INITS = {'instance_norm': cb.init_codebook, 'normal': cb.init_codebook_normal}
# `config.method.target_output`: each target layer's feed-forward output before the residual add
# (DinoSR's `layer_results`, after data2vec) or the whole block's output (hidden state).
TARGET_OUTPUTS = ('ffn', 'block')


class DinosrModel(nnx.Module):
  """SpeechEncoder (student) + one linear head per teacher target layer."""

  def __init__(self, enc_cfg: EncoderConfig, num_target_layers: int, codebook_size: int, *,
               rngs: nnx.Rngs):
    self.encoder = SpeechEncoder(enc_cfg, rngs=rngs)
    d = enc_cfg.hidden_size
    kw = dict(dtype=jnp.dtype(enc_cfg.dtype), param_dtype=jnp.float32, rngs=rngs)
    self.heads = nnx.List([dense(d, codebook_size, (EMBED, VOCAB), **kw)
                           for _ in range(num_target_layers)])


def transformer_params(model: DinosrModel) -> dict:
  """Pure dict of the student transformer's parameters (the teacher's shape)."""
  return nnx.to_pure_dict(nnx.state(model.encoder.encoder, nnx.Param))


def run_teacher(model: DinosrModel, teacher: dict, x: jax.Array, frame_mask: jax.Array,
                num_layers: int, target_output: str = 'ffn') -> tuple[jax.Array, ...]:
  """The student's transformer architecture with the teacher's weights, eval mode, no gradient.

  `x [B, T, D]` unmasked projected features. Returns one `[B, T, D]` output per block
  (`num_layers` of them): the feed-forward output before the residual add for
  `target_output='ffn'` (DinoSR / data2vec), the block output for `'block'`.
  """
  graphdef, params, rest = nnx.split(model.encoder.encoder, nnx.Param, ...)
  nnx.replace_by_pure_dict(params, jax.tree.map(jax.lax.stop_gradient, teacher))
  module = nnx.merge(graphdef, params, rest)
  hidden, _, ffn = module(jax.lax.stop_gradient(x), frame_mask, deterministic=True,
                          num_layers=num_layers, return_ffn=True)
  outs = ffn if target_output == 'ffn' else hidden[1:]
  return tuple(jax.lax.stop_gradient(h) for h in outs)


def dinosr_targets(hidden: tuple[jax.Array, ...], frame_mask: jax.Array, k: int) -> jax.Array:
  """Top-k layer outputs, instance-normalised over valid frames: `[K, B, T, D]` float32."""
  top = jnp.stack(hidden[-k:], axis=0)  # [K, B, T, D]
  return distillation.instance_norm_over_time(top, frame_mask)


def assign_and_update(codebooks: cb.CodebookState, targets: jax.Array, select: jax.Array,
                      decay: float) -> tuple[jax.Array, cb.CodebookState]:
  """Nearest codeword of every frame per layer and the EMA codebook update from `select` frames.

  `codebooks` stacked `[K, V, D]` / `[K, V]`; `targets [K, B, T, D]`; `select [B, T]`.
  Returns (codes `[K, B, T]` int32 from the codebooks *before* the update, updated codebooks).
  """

  def one(state, y):
    codes, _ = cb.nearest_codeword(y, cb.codebook_embeddings(state))  # [B, T]
    return codes, cb.codebook_update(state, y, codes, select, decay)

  return jax.vmap(one)(codebooks, targets)


def stacked_codebooks(codebooks) -> cb.CodebookState:
  """`extra_state['codebooks']` as a CodebookState (a restored checkpoint may hold a dict or a
  list of its two fields)."""
  if isinstance(codebooks, cb.CodebookState):
    return codebooks
  if isinstance(codebooks, dict):
    return cb.CodebookState(codebooks['sums'], codebooks['counts'])
  return cb.CodebookState(*codebooks)


def teacher_encoder(model: DinosrModel, teacher: dict) -> SpeechEncoder:
  """A copy of the student's encoder with the EMA teacher's transformer (the student's CNN and
  projection: the teacher's input in `loss_fn`); `model` itself is left as it is."""
  graphdef, params, rest = nnx.split(model.encoder, nnx.Param, ...)
  nnx.replace_by_pure_dict(params, {**nnx.to_pure_dict(params), 'encoder': teacher})
  return nnx.merge(graphdef, params, rest, copy=True)  # new Variables: `model` stays the student


def windowed_units(units: Callable, enc_cfg: EncoderConfig, window_samples: int) -> Callable:
  """`units(wav, mask, layer)` run on consecutive windows of `window_samples` samples, the frames
  concatenated back: same signature, same `[B, T]` outputs as `units` on the whole input.

  Window k starts at sample `k * hop`, `hop = F * stride` (`F = num_frames(window_samples)`,
  `stride` the CNN's total stride): its F frames are exactly frames `k*F .. k*F + F - 1` of the
  whole input (the CNN has no padding), so the frame count and the frame -> time alignment are
  the whole input's, and each window's units are those of running that window alone. Windows
  overlap by `window_samples - hop` samples (one CNN receptive field minus a stride). The last
  window is shorter (its mask), windows past a row's end have no valid frame. Static shapes:
  `[B, S]` -> `[B * n, window_samples]` with `n = ceil(T / F)`. A window of at least S samples
  is `units` itself.
  """
  w = int(window_samples)
  f = enc_cfg.num_frames(w)
  if f < 1:
    raise ConfigError(f'dinosr: an evaluation window of {w} samples gives no encoder frame')
  hop = f * math.prod(enc_cfg.conv_stride)

  def run(wav, mask, layer=None):
    b, s = wav.shape
    if w >= s:
      return units(wav, mask, layer)
    t = enc_cfg.num_frames(s)
    n = -(-t // f)  # windows to cover the T frames
    total = hop * (n - 1) + w
    wav_p = jnp.pad(wav, ((0, 0), (0, max(total - s, 0))))[:, :total]  # [B, total]
    mask_p = jnp.pad(mask, ((0, 0), (0, max(total - s, 0))))[:, :total]
    idx = hop * jnp.arange(n)[:, None] + jnp.arange(w)[None, :]  # [n, W]
    ids, fmask = units(wav_p[:, idx].reshape(b * n, w), mask_p[:, idx].reshape(b * n, w), layer)
    ids = ids.reshape(b, n * f)[:, :t]  # [B, T]
    fmask = fmask.reshape(b, n * f)[:, :t]
    return ids, fmask

  return run


def codebook_units_fn(encoder: SpeechEncoder, codebooks: cb.CodebookState, target_output: str,
                      window_samples: int = 0):
  """The 'units' prediction: `(wav [B, S], mask [B, S], layer) -> ([B, T] int32, frame_mask)`.

  Frames get the unit the loss would give them at target layer `layer` (1-based block index,
  among the top K = `codebooks`' leading dim): the layer's output of `encoder` (pass
  `teacher_encoder`'s: the codebooks hold statistics of the teacher's outputs) on the unmasked
  input -- its feed-forward output before the residual add (`target_output='ffn'`) or its block
  output ('block', also for the last layer) -- instance-normalised over each utterance's valid
  frames, then the nearest codeword of that layer's codebook. `window_samples > 0`: the same on
  consecutive windows of that many samples (`windowed_units`), as the crops of training.
  """
  num_layers = encoder.config.num_hidden_layers
  first = num_layers - int(codebooks.counts.shape[0]) + 1

  def units(wav, mask, layer=None):
    if layer is None or not first <= layer <= num_layers:
      raise ValueError(f'dinosr: layer {layer} has no codebook (the target layers are '
                       f'{first}..{num_layers})')
    i = layer - first
    codebook = cb.CodebookState(codebooks.sums[i], codebooks.counts[i])  # [V, D], [V]
    if target_output == 'ffn':
      x, _, frame_mask = encoder.embed(wav, mask, deterministic=True)
      _, _, ffn = encoder.encoder(x, frame_mask, num_layers=layer, return_ffn=True)
      h = ffn[layer - 1]  # [B, T, D]
    else:
      out = encoder(wav, mask, num_layers=max(layer, 1))
      h, frame_mask = out.hidden_states[layer], out.frame_mask
    y = distillation.instance_norm_over_time(h, frame_mask)
    ids, _ = cb.nearest_codeword(y, cb.codebook_embeddings(codebook))
    return ids, frame_mask

  if window_samples > 0:
    return windowed_units(units, encoder.config, window_samples)
  return units


def masked_prediction_loss(logits: jax.Array, codes: jax.Array,
                           select: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """DinoSR's loss: cross-entropy at the `select`ed (masked, valid) frames only.

  `logits [K, B, T, V]`, `codes [K, B, T]`, `select [B, T]`. Returns (loss = mean over layers of
  the per-layer mean over selected frames, per-layer losses `[K]`, accuracy averaged likewise).
  """
  sel = select.astype(jnp.float32)[None]  # [1, B, T]
  n = jnp.maximum(jnp.sum(sel), 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)
  per_layer = jnp.sum(ce * sel, axis=(1, 2)) / n  # [K]
  hit = (jnp.argmax(logits, -1) == codes).astype(jnp.float32)  # [K, B, T]
  acc = jnp.mean(jnp.sum(hit * sel, axis=(1, 2)) / n)
  return jnp.mean(per_layer), per_layer, acc


class DinosrPretraining(Method):
  """DinoSR pretraining (see the module docstring)."""

  name = 'dinosr'

  def __init__(self, config):
    super().__init__(config)
    self.enc_cfg = encoder_config(config.model)
    m = config.method
    self.num_layers = self.enc_cfg.num_hidden_layers
    self.k = int(m.average_top_k_layers)
    if not 1 <= self.k <= self.num_layers:
      raise ConfigError(f'config.method.average_top_k_layers={self.k} must be in '
                        f'1..{self.num_layers} (the encoder layers)')
    self.v = int(m.codebook_size)
    # Options beyond DinoSR's base.yaml (absent in older workdirs' config.json -> reference).
    self.codebook_init = str(m.get('codebook_init', 'instance_norm'))
    if self.codebook_init not in CODEBOOK_INITS:
      raise ConfigError(f'config.method.codebook_init={self.codebook_init!r}: one of '
                        f'{tuple(CODEBOOK_INITS)}')
    self.restart_patience = int(m.get('codebook_restart_patience', 0))
    self.mask_style = str(m.get('mask_style', 'exact'))
    if self.mask_style not in masking.MASK_STYLES:
      raise ConfigError(f'config.method.mask_style={self.mask_style!r}: one of '
                        f'{masking.MASK_STYLES}')
    skip = m.get('ema_skip', ())
    if isinstance(skip, str) or not all(isinstance(x, str) and x for x in skip):
      raise ConfigError(f'config.method.ema_skip={skip!r}: a tuple of parameter-path substrings '
                        "such as ('pos_conv',)")
    self.ema_skip = tuple(skip)
    # Older workdirs (config.json without the key) were trained on block outputs.
    self.target_output = str(m.get('target_output', 'block'))
    if self.target_output not in TARGET_OUTPUTS:
      raise ConfigError(f'config.method.target_output={self.target_output!r}: one of '
                        f'{TARGET_OUTPUTS}')
    self.num_samples = int(config.data.num_samples)
    self.num_frames = self.enc_cfg.num_frames(self.num_samples)
    if self.num_frames < 1:
      raise ConfigError(f'config.data.num_samples={self.num_samples} gives no encoder frame')
    window = int(m.get('eval_window_samples', 0))
    self.eval_window_samples = max(bucket_lengths(config.data)) if window < 0 else window
    if self.eval_window_samples > 0 and self.enc_cfg.num_frames(self.eval_window_samples) < 1:
      raise ConfigError(f'config.method.eval_window_samples={window} gives no encoder frame')

  @property
  def _dropout(self) -> bool:
    return self.enc_cfg.has_dropout

  def init(self, rng):
    p_rng, c_rng = jax.random.split(rng)
    model = DinosrModel(self.enc_cfg, self.k, self.v, rngs=nnx.Rngs(params=p_rng))
    d = self.enc_cfg.hidden_size
    init = CODEBOOK_INITS[self.codebook_init]
    codebooks = jax.vmap(lambda key: init(key, self.v, d))(
      jax.random.split(c_rng, self.k))  # sums [K, V, D], counts [K, V]
    # The teacher starts as an exact copy of the student's transformer.
    teacher = jax.tree.map(jnp.array, transformer_params(model))
    paths = [name for name, _ in pruning.named_leaves(teacher)]
    for sub in self.ema_skip:
      if not any(sub in p for p in paths):  # a typo would silently EMA everything
        raise ConfigError(f'config.method.ema_skip: {sub!r} is in no teacher parameter path '
                          f'(e.g. {paths[:3]})')
    extra = {'teacher': teacher, 'codebooks': codebooks}
    if self.restart_patience > 0:
      extra['codebook_idle'] = jnp.zeros((self.k, self.v), jnp.int32)  # steps unused, [K, V]
    return model, extra

  def extra_state_logical_axes(self, extra_state):
    """The teacher is sharded like the student transformer; codebooks are replicated."""
    from jaxspeech.layers import partitioning

    def student_axes():
      model = DinosrModel(self.enc_cfg, self.k, self.v, rngs=nnx.Rngs(params=0))
      return nnx.state(model.encoder.encoder, nnx.Param)

    teacher_axes = partitioning.param_logical_axes(nnx.eval_shape(student_axes))
    axes = {'teacher': teacher_axes,
            'codebooks': jax.tree.map(lambda _: None, extra_state['codebooks'])}
    if 'codebook_idle' in extra_state:
      axes['codebook_idle'] = None
    return axes

  def loss_fn(self, model: DinosrModel, extra_state, batch, rng):
    m = self.config.method
    wav, wav_mask = batch['audio'], batch['audio_mask']  # [B, S]
    mask_rng, drop_rng, enc_rng = jax.random.split(rng, 3)
    dropout = self._dropout
    enc = model.encoder
    # Unmasked projected features, before feature-projection dropout (the teacher's input).
    x, _, frame_mask = enc.embed(wav, wav_mask, deterministic=True)  # [B, T, D], [B, T]
    masked = masking.span_mask(mask_rng, frame_mask, float(m.mask_prob), int(m.mask_length),
                               style=self.mask_style)
    x_s = x
    rate = self.enc_cfg.feat_proj_dropout
    if dropout and rate > 0:
      keep = jax.random.bernoulli(drop_rng, 1.0 - rate, x.shape)
      x_s = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    x_s = jnp.where(masked[..., None], enc.masked_spec_embed[...].astype(x.dtype), x_s)
    _, last = enc.encoder(x_s, frame_mask, deterministic=not dropout,
                          rng=enc_rng if dropout else None)  # [B, T, D]

    hidden_t = run_teacher(model, extra_state['teacher'], x, frame_mask, self.num_layers,
                           self.target_output)
    targets = dinosr_targets(hidden_t, frame_mask, self.k)  # [K, B, T, D]
    select = masked & frame_mask  # [B, T]
    codes, codebooks = assign_and_update(extra_state['codebooks'], targets, select,
                                         float(m.codebook_decay))  # [K, B, T]
    new_extra = {**extra_state, 'codebooks': codebooks}
    if self.restart_patience > 0:
      codebooks, idle = jax.vmap(
        lambda st, i, y, c, key: cb.restart_dead_codewords(st, i, y, c, select, key,
                                                           self.restart_patience))(
        codebooks, extra_state['codebook_idle'], targets, codes,
        jax.random.split(jax.random.fold_in(rng, 1), self.k))
      new_extra.update(codebooks=codebooks, codebook_idle=idle)

    logits = jnp.stack([head(last) for head in model.heads]).astype(jnp.float32)  # [K, B, T, V]
    loss, per_layer, acc = masked_prediction_loss(logits, codes, select)
    metrics = {}
    counts = []
    for i in range(self.k):
      usage = cb.codebook_usage(codes[i], select, self.v)
      metrics[f'loss_layer_{i}'] = per_layer[i]
      metrics[f'codebook_ppl_{i}'] = usage['perplexity']
      metrics[f'codebook_used_{i}'] = usage['used_fraction']
      counts.append(jnp.sum(jax.nn.one_hot(codes[i], self.v) * select[..., None], axis=(0, 1)))
    sel = select.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(sel), 1.0)
    probs = jnp.sum(jax.nn.softmax(logits, -1) * sel[..., None], axis=(1, 2)) / n  # [K, V]
    p = jnp.mean(probs, 0)  # [V]
    metrics.update(
      acc_masked=acc,
      # Accuracy of always predicting each layer's most frequent target (mean over layers).
      majority_baseline=jnp.mean(jnp.max(jnp.stack(counts), -1)) / n,
      pred_ppl=jnp.exp(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)))),
      codebook_used_min=jnp.min(jnp.stack([metrics[f'codebook_used_{i}']
                                           for i in range(self.k)])),
      masked_fraction=jnp.sum(sel) / jnp.maximum(jnp.sum(frame_mask), 1),
    )
    return loss, (metrics, new_extra)

  def teacher_decay(self, step):
    m = self.config.method
    freeze = int(m.freeze_teacher_step)
    return distillation.ema_decay_schedule(step, float(m.ema_decay), float(m.ema_end_decay),
                                           int(m.ema_anneal_end_step),
                                           freeze if freeze > 0 else None)

  def predict_fns(self, model: DinosrModel, extra_state):
    """The base 'features' (the student's encoder) plus 'units' (`codebook_units_fn`: the
    teacher's transformer and the codebooks of the extra state; `layer` must be a target
    layer)."""
    fns = super().predict_fns(model, extra_state)
    fns['units'] = self.units_fn(model, extra_state)
    return fns

  def units_fn(self, model: DinosrModel, extra_state, window_samples: int | None = None):
    """The 'units' prediction with evaluation windows of `window_samples` (None = the config's
    `eval_window_samples`, 0 = whole utterances)."""
    window = self.eval_window_samples if window_samples is None else int(window_samples)
    return codebook_units_fn(teacher_encoder(model, extra_state['teacher']),
                             stacked_codebooks(extra_state['codebooks']), self.target_output,
                             window)

  def post_update(self, params, extra_state, step):
    student = params
    for key in TRANSFORMER_PATH:
      student = student[key]
    decay = self.teacher_decay(step)
    teacher = distillation.ema_update(extra_state['teacher'], student, decay)
    if self.ema_skip:
      # fairseq's EMAModule copies skip_keys from the student at each step; once the teacher is
      # frozen (decay 1) DinoSR stops stepping it, so they freeze too.
      copy = jnp.asarray(decay) < 1.0

      def skip(path, t, s):
        p = pruning.path_str(path)
        return jnp.where(copy, s.astype(t.dtype), t) if any(k in p for k in self.ema_skip) else t

      teacher = jax.tree_util.tree_map_with_path(skip, teacher, student)
    return params, {**extra_state, 'teacher': teacher}
