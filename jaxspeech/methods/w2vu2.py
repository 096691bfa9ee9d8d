"""wav2vec-U 2.0 (Liu et al., 2022): phone recognition from unpaired speech and text, a GAN.

    features [B, T, D] (frozen encoder layer or MFCC, cached) -> Generator (masked BatchNorm,
    residual linear, Conv1d k=9 stride 3) -> phone logits [B, T', V] -> JOIN segmentation ->
    softmax -> Discriminator (causal convs) <- one-hot phone sequences of unpaired text [B, L, V]

Two parameter groups in the ONE train step (fairseq `config/gan/w2vu2.yaml`, `wav2vec_u.py`):
  discriminator  L_D = BCE(D(fake), 1) + BCE(D(real), 0) + gp * gradient penalty
                 (fairseq's D scores "generated"; updated on odd steps)
  generator      L_G = BCE(D(fake), 0) + code_penalty * (V - prob_ppl) / V
                       + smoothness * mean (s_{t+1} - s_t)^2 over segments
                       + mmi * CE(aux head, 64-cluster MFCC k-means target)   (even steps)
fairseq sums the per-utterance terms and divides the gradient by the batch size (sample_size);
here every term is that batch mean, which is the same gradient.

Supervised reference (`config.method.supervised = True`): the same generator on the same cached
features trained with CTC on the rows' true phone sequences (silence dropped; one extra output,
the blank); no discriminator. It is the upper bound the unsupervised model is compared with.

Data: the rows of a feature cache (`data_pipelines.features`; `config.data.manifest`, or for
`config.method.features = 'mfcc'` the built-in corpus's MFCC cache made on demand), padded /
cropped to `config.method.max_frames`; the text side is `config.method.text_manifest`
(`python -m data_pipelines.text`; default: built-in grammar sentences of `text_seed`, every
sentence of the audio's transcripts removed) held whole in the extra state as a [N_text, L]
table from which each step draws B sentences with its rng. The phone vocabulary is the text's
(host state, `WORKDIR/host_state.json`).

Decoding (`predict_fns()['tokens']`): per-frame argmax of the generator in evaluation mode
(running BatchNorm statistics, no dropout); `decode` merges runs of one token and drops silence
(and the CTC blank), as fairseq's viterbi decoding in `w2vu_generate.py`.

Legend: B batch, T feature frames (50 Hz), T' = generator frames (T / stride), D feature width,
V phones (+ blank when supervised), L longest text sequence, N_text text table rows, A aux
clusters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxspeech.methods.base import Method
from jaxspeech.models.w2vu import Discriminator, Generator
from jaxspeech.ops import gan, segment

SILENCE = '_'
BLANK = '<blank>'


class W2vuModel(nnx.Module):
  """Generator + discriminator (None for the supervised reference)."""

  def __init__(self, generator: Generator, discriminator: Discriminator | None):
    self.generator = generator
    self.discriminator = discriminator


def decode(ids: np.ndarray, n: int, vocab: Sequence[str],
           drop: Sequence[str] = (SILENCE, BLANK)) -> list[str]:
  """Frame token ids [T] (first `n` valid) -> phones: runs merged, silence / blank dropped."""
  out, prev = [], None
  for i in np.asarray(ids)[:n]:
    i = int(i)
    if i != prev:
      tok = vocab[i]
      if tok not in drop:
        out.append(tok)
    prev = i
  return out


def reference_phones(row: dict) -> list[str]:
  """The row's true phone sequence from its `alignment` (silence dropped)."""
  if 'alignment' not in row:
    raise KeyError(f'row {row.get("id")!r} has no alignment (its reference phones)')
  return [seg[0] for seg in row['alignment'] if seg[0] != SILENCE]


class W2vu2Method(Method):
  name = 'w2vu2'
  encoder_path = None
  uses_audio = False

  def __init__(self, config):
    super().__init__(config)
    m = config.method
    self.supervised = bool(m.supervised)
    self.max_frames = int(m.max_frames)
    self.input_dim = int(m.input_dim)
    self.vocab: list[str] | None = None  # phones (host state); + BLANK when supervised
    self.text_path: str | None = None

  # --- host state: the phone vocabulary of the text ------------------------------------------

  def text_manifest(self) -> str:
    m, d = self.config.method, self.config.data
    path = str(m.text_manifest)
    if path:
      if not os.path.exists(path):
        raise FileNotFoundError(f'config.method.text_manifest={path!r}: no such file')
      return path
    from data_pipelines import synth, text

    corpus = synth.built_in_corpus(str(d.cache_dir) or None,
                                   num_utterances=int(d.builtin_utterances))
    n, seed, sil, sur = (int(m.text_sentences), int(m.text_seed), float(m.sil_prob),
                         str(m.sil_surround))
    out = os.path.join(str(d.cache_dir) or synth.default_cache_dir(), 'w2vu_text',
                       f'text-{n}-seed{seed}-sil{sil:g}-{sur}-excl{int(d.builtin_utterances)}'
                       '.jsonl')
    if not os.path.exists(out):
      text.write_text_manifest(out, synth.generate_sentences(n, seed), sil_prob=sil, seed=seed,
                               exclude_manifest=corpus, surround=sur)
    return out

  def fit_host_state(self, rows):
    del rows  # the vocabulary is the text side's
    from data_pipelines.phones import US_PHONES
    from data_pipelines.text import read_text_manifest

    path = self.text_manifest()
    used = {p for s in read_text_manifest(path) for p in s}
    phones = [p for p in US_PHONES if p in used] + sorted(used - set(US_PHONES))
    return {'phones': phones, 'text_manifest': os.path.abspath(path)}

  def set_host_state(self, host_state):
    if not host_state or 'phones' not in host_state:
      raise ValueError('w2vu2: host_state.json has no "phones" (the text vocabulary)')
    self.vocab = list(host_state['phones']) + ([BLANK] if self.supervised else [])
    self.text_path = host_state['text_manifest']

  def phone_vocab(self) -> list[str]:
    if self.vocab is None:  # not bound by a workdir: fit as a fresh run would
      self.set_host_state(self.fit_host_state([]))
    return self.vocab

  @property
  def num_phones(self) -> int:
    return len(self.phone_vocab()) - (1 if self.supervised else 0)

  # --- data -----------------------------------------------------------------------------------

  def default_manifest(self, data_config):
    feats = str(self.config.method.features)
    if feats != 'mfcc':
      raise ValueError(
        f'config.method.features={feats!r} and config.data.manifest is empty: build the feature '
        'cache first (python -m jaxspeech.w2vu features --encoder ENC --layer L --out DIR) and '
        'set config.data.manifest=DIR/manifest.jsonl, or run the whole pipeline with '
        'python -m jaxspeech.w2vu run')
    return mfcc_cache(data_config)

  def row_fields(self):
    t, d = self.max_frames, self.input_dim
    fields = {'feats': jax.ShapeDtypeStruct((t, d), jnp.float32),
              'feat_mask': jax.ShapeDtypeStruct((t,), jnp.bool_),
              'aux': jax.ShapeDtypeStruct((t,), jnp.int32)}
    if self.supervised:
      fields['labels'] = jax.ShapeDtypeStruct((int(self.config.method.max_label_length),),
                                              jnp.int32)
      fields['label_length'] = jax.ShapeDtypeStruct((), jnp.int32)
    return fields

  def host_fields(self, row):
    from data_pipelines.features import row_features

    x, aux = row_features(row)
    if x.shape[1] != self.input_dim:
      raise ValueError(f'row {row.get("id")!r}: features are {x.shape[1]}-d but '
                       f'config.method.input_dim={self.input_dim}')
    t = min(len(x), self.max_frames)  # longer rows are cropped (training only)
    feats = np.zeros((self.max_frames, self.input_dim), np.float32)
    feats[:t] = x[:t]
    out = {'feats': feats, 'feat_mask': np.arange(self.max_frames) < t,
           'aux': np.pad(aux[:t], (0, self.max_frames - t), constant_values=-1)}
    if self.supervised:
      u = int(self.config.method.max_label_length)
      index = {p: i for i, p in enumerate(self.phone_vocab())}
      phones = reference_phones(row) if 'alignment' in row else []
      labels = np.zeros((u,), np.int32)
      ok = 0 < len(phones) <= u and len(x) <= self.max_frames and all(p in index for p in phones)
      if ok:
        labels[:len(phones)] = [index[p] for p in phones]
      out['labels'], out['label_length'] = labels, np.int32(len(phones) if ok else -1)
    return out

  def prepare(self, extra_state, batches):
    """The text table: `text_rows` sentences of the text manifest (cycled when it has fewer),
    as phone ids [N_text, L] (longer sentences cut at L) and lengths [N_text]."""
    del batches
    from data_pipelines.text import read_text_manifest

    m = self.config.method
    index = {p: i for i, p in enumerate(self.phone_vocab())}
    seqs = read_text_manifest(self.text_path)
    if not seqs:
      raise ValueError(f'{self.text_path}: no sentences')
    n, length = extra_state['text'].shape
    table = np.zeros((n, length), np.int32)
    lens = np.zeros((n,), np.int32)
    order = np.random.default_rng(int(m.text_seed)).permutation(len(seqs))
    for r in range(n):
      s = seqs[order[r % len(seqs)]][:length]
      table[r, :len(s)] = [index[p] for p in s]
      lens[r] = len(s)
    return {**extra_state, 'text': jnp.asarray(table), 'text_len': jnp.asarray(lens)}

  # --- model ----------------------------------------------------------------------------------

  def init(self, rng):
    m = self.config.method
    rngs = nnx.Rngs(params=rng)
    v = len(self.phone_vocab())
    gen = Generator(self.input_dim, v, kernel=int(m.generator_kernel),
                    stride=int(m.generator_stride), bias=bool(m.generator_bias),
                    dropout=float(m.generator_dropout), batch_norm=float(m.generator_batch_norm),
                    residual=bool(m.generator_residual),
                    aux_dim=0 if self.supervised else int(m.aux_clusters), rngs=rngs)
    disc = None if self.supervised else Discriminator(
      v, inner_dim=int(m.discriminator_dim), kernel=int(m.discriminator_kernel),
      depth=int(m.discriminator_depth), causal=bool(m.discriminator_causal),
      dropout=float(m.discriminator_dropout), rngs=rngs)
    extra = {'bn_mean': jnp.zeros((self.input_dim,), jnp.float32),
             'bn_var': jnp.ones((self.input_dim,), jnp.float32),
             'text': jnp.zeros((int(m.text_rows), int(m.max_text_length)), jnp.int32),
             'text_len': jnp.zeros((int(m.text_rows),), jnp.int32)}
    return W2vuModel(gen, disc), extra

  def param_groups(self, params):
    groups = ('generator',) if self.supervised else ('generator', 'discriminator')
    return {g: {k: jax.tree.map(lambda _, same=(k == g): same, v) for k, v in params.items()}
            for g in groups}

  def _generate(self, model: W2vuModel, extra_state, batch, *, train: bool, rng=None):
    mask = batch['feat_mask'] & batch['valid'][:, None]  # [B, T]
    return model.generator(batch['feats'], mask, (extra_state['bn_mean'], extra_state['bn_var']),
                           train=train, rng=rng)

  def loss_fn(self, model: W2vuModel, extra_state, batch, rng):
    m = self.config.method
    drop_rng, seg_rng, gp_rng, text_rng = jax.random.split(rng, 4)
    out = self._generate(model, extra_state, batch, train=True, rng=drop_rng)
    mean, var = out['bn_stats']
    new_extra = {**extra_state, 'bn_mean': mean, 'bn_var': var}
    logits, lmask = out['logits'].astype(jnp.float32), out['mask']  # [B, T', V], [B, T']
    w = batch['valid'].astype(jnp.float32)  # [B]
    nb = jnp.maximum(jnp.sum(w), 1.0)
    if self.supervised:
      return self._ctc_loss(logits, lmask, batch, new_extra)

    seg, smask, nseg = segment.join_segment(logits, lmask, seg_rng)  # [B, T', V], [B, T'], [B]
    fake = jax.nn.softmax(seg, axis=-1)  # [B, T', V]
    code_ppl, prob_ppl = gan.code_perplexity(seg, smask)
    b = logits.shape[0]
    pick = jax.random.randint(text_rng, (b,), 0, extra_state['text'].shape[0])
    tokens, tlen = extra_state['text'][pick], extra_state['text_len'][pick]  # [B, L], [B]
    tmask = jnp.arange(tokens.shape[1])[None, :] < tlen[:, None]  # [B, L]
    v = logits.shape[-1]
    real = jax.nn.one_hot(tokens, v) * tmask[..., None]  # [B, L, V]

    disc = model.discriminator
    dense_y = disc(fake, smask)  # [B]  "generated" logit
    token_y = disc(real, tmask)  # [B]
    # Discriminator: generated -> 1, real -> 0 (fairseq's convention); the generator's terms
    # are computed from the same forward pass but only differentiated for its own group.
    loss_dense_d = jnp.sum(w * jax.nn.softplus(-dense_y)) / nb
    loss_token_d = jnp.sum(w * jax.nn.softplus(token_y)) / nb
    gp = gan.gradient_penalty(lambda z: disc(z, None), real, fake, gp_rng) / b
    loss_d = loss_dense_d + loss_token_d + float(m.gradient_penalty) * gp

    loss_dense_g = jnp.sum(w * jax.nn.softplus(dense_y)) / nb
    code_pen = (v - prob_ppl) / v
    smooth = gan.smoothness_penalty(seg, smask)
    aux_logits = out['aux_logits']  # [B, T, A]
    aux, amask = batch['aux'], (batch['aux'] >= 0) & batch['feat_mask'] & batch['valid'][:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(aux_logits.astype(jnp.float32),
                                                         jnp.maximum(aux, 0))  # [B, T]
    mmi = jnp.sum(jnp.where(amask, ce, 0.0)) / jnp.maximum(jnp.sum(amask), 1)
    loss_g = (loss_dense_g + float(m.code_penalty) * code_pen + float(m.smoothness_weight) * smooth
              + float(m.mmi_weight) * mmi)
    metrics = {
      'loss_d': loss_d, 'loss_g': loss_g, 'loss_dense_d': loss_dense_d,
      'loss_token_d': loss_token_d, 'loss_dense_g': loss_dense_g, 'grad_pen': gp,
      'code_pen': code_pen, 'smoothness': smooth, 'mmi': mmi,
      'code_ppl': code_ppl, 'prob_ppl': prob_ppl,
      # fairseq's accuracy_dense / accuracy_token: how often D tells them apart
      'accuracy_dense': jnp.sum(w * (dense_y > 0)) / nb,
      'accuracy_token': jnp.sum(w * (token_y < 0)) / nb,
      'segments': jnp.sum(w * nseg) / nb, 'text_length': jnp.mean(tlen.astype(jnp.float32)),
      'bn_var_mean': jnp.mean(var),
    }
    return {'generator': loss_g, 'discriminator': loss_d}, (metrics, new_extra)

  def _ctc_loss(self, logits, lmask, batch, new_extra):
    labels, lengths = batch['labels'], batch['label_length']  # [B, U], [B]
    use = batch['valid'] & (lengths > 0)
    blank = logits.shape[-1] - 1
    u = labels.shape[1]
    per_seq = optax.ctc_loss(logits, (~lmask).astype(jnp.float32), labels,
                             (jnp.arange(u)[None, :] >= jnp.maximum(lengths, 0)[:, None]
                              ).astype(jnp.float32), blank_id=blank)  # [B]
    feasible = jnp.isfinite(per_seq) & (per_seq < 1e5)  # too few frames for the labels: +inf
    use = use & feasible
    n = jnp.maximum(jnp.sum(use), 1)
    loss = jnp.sum(jnp.where(use, per_seq, 0.0)) / n
    metrics = {'ctc_loss': loss, 'used_fraction': jnp.mean(use.astype(jnp.float32)),
               'blank_fraction': jnp.sum((jnp.argmax(logits, -1) == blank) & lmask)
               / jnp.maximum(jnp.sum(lmask), 1)}
    return {'generator': loss}, (metrics, new_extra)

  # --- prediction -----------------------------------------------------------------------------

  def predict_fns(self, model, extra_state):
    def tokens(batch):
      out = self._generate(model, extra_state, batch, train=False)
      return jnp.argmax(out['logits'], axis=-1).astype(jnp.int32), out['mask']

    return {'tokens': tokens}


def mfcc_cache(data_config) -> str:
  """The feature cache (`data_pipelines.features`) of the built-in corpus's 39-d MFCCs at 50 Hz
  (the MFCC input of the paper's ablation), built once under the cache folder."""
  from data_pipelines import features as feature_cache
  from data_pipelines import synth
  from data_pipelines.manifest import read_manifest
  from jaxspeech.audio import load_audio

  n = int(data_config.builtin_utterances)
  corpus = synth.built_in_corpus(str(data_config.cache_dir) or None, num_utterances=n)
  out = os.path.join(str(data_config.cache_dir) or synth.default_cache_dir(), 'w2vu_features',
                     f'synth-{n}-mfcc')
  # mfcc_input_scale: caches made before Dec 2 (waveform x 32768) are rebuilt.
  meta = {'source': 'mfcc', 'layer': 0, 'corpus': os.path.abspath(corpus),
          'mfcc_input_scale': 'fairseq'}
  if not feature_cache.cache_is_complete(out, meta):
    rows = read_manifest(corpus)
    mf = utterance_mfccs([load_audio(r['path']) for r in rows])
    feature_cache.write_feature_cache(out, rows, mf, mf, meta=meta)
  return os.path.join(out, 'manifest.jsonl')


def utterance_mfccs(wavs: Sequence[np.ndarray], input_scale: str = 'fairseq') -> list[np.ndarray]:
  """39-d MFCC + deltas at 50 Hz (HuBERT's iteration-1 features as fairseq computes them,
  `methods.hubert.mfcc_deltas`; `input_scale` 'fairseq' = samples in [-1, 1], 'kaldi' = x 32768)
  of each waveform: one [T_i, 39] array, T_i = the tiny encoder's frame count. Computed on
  whole-second padded batches of one (few compilations), deltas over the utterance's own frames."""
  from jaxspeech.methods import hubert
  from jaxspeech.models.speech_encoder import EncoderConfig

  cfg = EncoderConfig.preset('tiny')  # only its conv geometry: 20 ms frames
  feats_fn = jax.jit(hubert.mfcc_deltas, static_argnums=2)
  out = []
  for w in wavs:
    t, f = cfg.num_frames(len(w)), hubert.num_mfcc_frames(len(w))
    if t < 1 or f < 2 * t - 1:
      raise ValueError(f'utterance of {len(w)} samples: too short for MFCC frames')
    pad = -(-len(w) // 16000) * 16000
    x = np.zeros((1, pad), np.float32)
    x[0, :len(w)] = w
    feats = feats_fn(jnp.asarray(x), jnp.asarray([len(w)]), input_scale)[0]  # [F_pad, 39]
    out.append(np.asarray(feats[0:2 * t:2], np.float32))
  return out
