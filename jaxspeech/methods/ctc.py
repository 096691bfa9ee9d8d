"""CTC fine-tuning of a pretrained speech encoder (wav2vec 2.0 recipe), with optional pruning.

    waveform [B, S] -> SpeechEncoder -> [B, T, D] -> Linear D->V -> CTC (optax.ctc_loss, blank 0)

Targets are character or phone sequences of the manifest rows (`config.method.unit`):
  char   fairseq's letter targets: lower-cased a-z and the apostrophe, '|' between words; other
         characters (punctuation) are dropped. WER/CER on the text these tokens spell.
  phone  the row's `phones` (space-separated), silence '_' dropped; the inventory is every phone
         of the whole manifest (all splits), sorted. PER on these tokens.

Labels reach the jitted step through the Method contract's host fields: the vocabulary and the
longest label sequence U are host state (`fit_host_state` on the training manifest, stored in
WORKDIR/host_state.json, read back at evaluation), and `host_fields` maps every manifest row to
`labels` int32 [U] (0-padded) and `label_length` int32 [] (-1 = no reference, or the row is
longer than the longest bucket, `config.data.num_samples`) in the Grain workers. Utterances
longer than that would be cropped by the pipeline and lose their
transcript alignment, so they (and filler rows) are left out of the loss (counted in
`metrics['used_fraction']`); so are those too short for their labels under CTC (fairseq's
`zero_infinity`). Loss = mean over utterances of -log p(labels | audio) (fairseq `sentence_avg`).

Pruning (`config.prune`, see `jaxspeech.methods.parp`, whose `parp` method is this one with
pruning on by default): masks live in the extra state; the first
step of a pruned run is the pruning step (no update: its gradient is zeroed, then `post_update`
prunes the initial parameters); PARP re-prunes every `prune.every` updates and at the last one.

Fine-tuning details kept from wav2vec 2.0: the conv feature extractor is frozen by config
(`train.trainable`), the transformer is frozen for the first `method.freeze_encoder_steps`
updates (only the head learns; fairseq `freeze_finetune_updates`), and input frames are
span-masked (`method.mask_prob`, span `method.mask_length`) with the encoder's learned mask
embedding during training.

Legend: B batch, S samples, T frames (50 Hz), D width, V vocabulary (blank = 0), N manifest rows,
U longest label sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxspeech.errors import ConfigError
from jaxspeech.layers.attention import dense
from jaxspeech.layers.partitioning import EMBED, VOCAB
from jaxspeech.methods.base import Method, bucket_lengths, encoder_config
from jaxspeech.methods.prune_spec import PruneSpec
from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder
from jaxspeech.ops import masking

UNITS = ('char', 'phone')
BLANK = '<blank>'
WORD_SEP = '|'
CHARS = (WORD_SEP,) + tuple('abcdefghijklmnopqrstuvwxyz') + ("'",)
SILENCE = '_'


# ---------------------------------------------------------------------------------------------
# Vocabularies and reference tokens.


def char_tokens(text: str) -> list[str]:
  """'Nine cold cats.' -> ['n','i','n','e','|','c','o','l','d','|','c','a','t','s']."""
  words = [''.join(c for c in w if c in CHARS) for w in text.lower().split()]
  words = [w for w in words if w]
  out: list[str] = []
  for i, w in enumerate(words):
    if i:
      out.append(WORD_SEP)
    out.extend(w)
  return out


def phone_tokens(phones: str) -> list[str]:
  return [p for p in phones.split() if p != SILENCE]


def reference_tokens(row: dict, unit: str) -> list[str]:
  """The target token sequence of a manifest row ([] when it has no text/phones)."""
  if unit == 'phone':
    return phone_tokens(row.get('phones') or '')
  if unit == 'char':
    return char_tokens(row.get('text') or '')
  raise ConfigError(f'config.method.unit={unit!r}: choose one of {UNITS}')


class Vocab:
  """Token <-> id; id 0 is the CTC blank."""

  def __init__(self, tokens: Sequence[str]):
    self.tokens = (BLANK, *tokens)
    self.index = {t: i for i, t in enumerate(self.tokens)}
    if len(self.index) != len(self.tokens):
      raise ValueError(f'duplicate tokens in the vocabulary {tokens}')

  def __len__(self) -> int:
    return len(self.tokens)

  def encode(self, tokens: Sequence[str]) -> list[int]:
    unknown = sorted({t for t in tokens if t not in self.index})
    if unknown:
      raise ValueError(f'tokens {unknown} are not in the vocabulary')
    return [self.index[t] for t in tokens]

  def decode(self, ids: Sequence[int]) -> list[str]:
    return [self.tokens[int(i)] for i in ids if int(i) != 0]

  @staticmethod
  def to_text(tokens: Sequence[str]) -> str:
    """Character tokens -> words separated by single spaces."""
    return ' '.join(''.join(tokens).replace(WORD_SEP, ' ').split())


def build_vocab(rows: Sequence[dict], unit: str) -> Vocab:
  if unit == 'char':
    return Vocab(CHARS)
  if unit == 'phone':
    inventory = sorted({p for r in rows for p in phone_tokens(r.get('phones') or '')})
    if not inventory:
      raise ValueError('config.method.unit="phone": no manifest row has `phones`')
    return Vocab(inventory)
  raise ConfigError(f'config.method.unit={unit!r}: choose one of {UNITS}')


def row_labels(row: dict, unit: str, vocab: Vocab, max_samples: int,
               max_length: int) -> tuple[np.ndarray, np.int32]:
  """Label ids `[max_length]` (0 in padding) and the length of one manifest row; length -1 marks
  rows left out of the loss (no reference, or longer than `max_samples` at 16 kHz so the
  pipeline crops it)."""
  ids = vocab.encode(reference_tokens(row, unit))
  if len(ids) > max_length:
    raise ValueError(f'{row.get("path", row)}: {len(ids)} {unit} labels, more than the '
                     f'{max_length} of the training manifest (host_state.json max_label_length)')
  n16k = -(-int(row['n_samples']) * 16000 // int(row.get('sample_rate', 16000)))
  out = np.zeros((max_length,), np.int32)
  out[:len(ids)] = ids
  return out, np.int32(len(ids) if ids and n16k <= max_samples else -1)


def label_table(rows: Sequence[dict], unit: str, vocab: Vocab,
                max_samples: int) -> tuple[np.ndarray, np.ndarray]:
  """`row_labels` of every row: `[N, U]` and `[N]` with U the longest label sequence."""
  u = max([len(reference_tokens(r, unit)) for r in rows] + [1])
  pairs = [row_labels(r, unit, vocab, max_samples, u) for r in rows]
  return (np.stack([p[0] for p in pairs]).reshape(len(rows), u),
          np.asarray([p[1] for p in pairs], np.int32))


# ---------------------------------------------------------------------------------------------
# Model, loss, decoding.


class CtcModel(nnx.Module):
  """SpeechEncoder + a linear CTC head over the vocabulary."""

  def __init__(self, enc_cfg: EncoderConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.encoder = SpeechEncoder(enc_cfg, rngs=rngs)
    self.head = dense(enc_cfg.hidden_size, vocab_size, (EMBED, VOCAB),
                      dtype=jnp.dtype(enc_cfg.dtype), param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, wav, wav_mask=None, **encoder_kw) -> tuple[jax.Array, jax.Array]:
    """`[B, S]` -> logits `[B, T, V]` float32, frame mask `[B, T]`."""
    out = self.encoder(wav, wav_mask, **encoder_kw)
    return self.head(out.last_hidden_state).astype(jnp.float32), out.frame_mask


def ctc_loss(logits: jax.Array, frame_mask: jax.Array, labels: jax.Array,
             label_lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """-log p(labels | logits) per utterance `[B]` and whether it is feasible `[B]`.

  logits `[B, T, V]` (blank = 0), frame_mask `[B, T]` True = valid, labels `[B, U]`,
  label_lengths `[B]`. An utterance is infeasible when its valid frames cannot hold its labels
  (one frame per label plus a blank between repeated labels).
  """
  u = labels.shape[1]
  label_valid = jnp.arange(u)[None, :] < label_lengths[:, None]  # [B, U]
  per_seq = optax.ctc_loss(logits, (~frame_mask).astype(jnp.float32), labels,
                           (~label_valid).astype(jnp.float32), blank_id=0)  # [B]
  repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & label_valid[:, 1:], axis=1)  # [B]
  feasible = jnp.sum(frame_mask, axis=1) >= label_lengths + repeats
  return per_seq, feasible


def greedy_decode(best: np.ndarray, frame_mask: np.ndarray) -> list[list[int]]:
  """Best-path decoding: per-frame argmax ids `[B, T]` -> collapse repeats, drop blanks (0) and
  padded frames. Returns one id list per row."""
  out = []
  for ids, valid in zip(np.asarray(best), np.asarray(frame_mask)):
    seq, prev = [], None
    for i in ids[valid]:
      i = int(i)
      if i != prev and i != 0:
        seq.append(i)
      prev = i
    out.append(seq)
  return out


# ---------------------------------------------------------------------------------------------
# The method.


class CtcFinetuning(Method):
  """CTC fine-tuning (+ optional magnitude pruning: none / omp / imp / mpi / parp)."""

  name = 'ctc'

  def __init__(self, config):
    super().__init__(config)
    self.enc_cfg = encoder_config(config.model)
    self.unit = str(config.method.unit)
    if self.unit not in UNITS:
      raise ConfigError(f'config.method.unit={self.unit!r}: choose one of {UNITS}')
    self.prune = PruneSpec.from_config(config)
    self.vocab: Vocab | None = None
    self.max_label_length = 0

  # --- host state: the vocabulary and U, fitted on the training manifest once ------------------

  def fit_host_state(self, rows):
    # The phone inventory is every phone of the whole manifest (all splits), as before spine v2.
    vocab = build_vocab(_all_split_rows(self.config.data), self.unit)
    max_len = max([len(reference_tokens(r, self.unit)) for r in rows] + [1])
    n_samples = max(bucket_lengths(self.config.data))
    if not any(row_labels(r, self.unit, vocab, n_samples, max_len)[1] > 0 for r in rows):
      raise ValueError(f'ctc: no training row has a {self.unit} reference that fits '
                       f'the longest bucket, {n_samples} samples')
    return {'unit': self.unit, 'tokens': list(vocab.tokens[1:]), 'max_label_length': max_len}

  def set_host_state(self, host_state):
    if not host_state:
      raise ValueError('ctc: no host state (vocabulary). A workdir made before spine v2 has no '
                       'host_state.json: write {"unit", "tokens", "max_label_length"} there, or '
                       'retrain')
    if host_state.get('unit') != self.unit:
      raise ValueError(f'host_state.json unit={host_state.get("unit")!r} but config.method.unit='
                       f'{self.unit!r}')
    self.vocab = Vocab(host_state['tokens'])
    self.max_label_length = int(host_state['max_label_length'])

  def _need_vocab(self) -> Vocab:
    if self.vocab is None:
      # Not bound by a workdir (the trainer and `load_workdir_model` bind host_state.json before
      # anything else): a run built straight from its config (benchmarks, AOT compiles, tests)
      # fits it on the configured training rows, exactly as a fresh training run would.
      self.set_host_state(self.fit_host_state(self.training_rows()))
    return self.vocab

  def row_fields(self):
    self._need_vocab()
    return {'labels': jax.ShapeDtypeStruct((self.max_label_length,), jnp.int32),
            'label_length': jax.ShapeDtypeStruct((), jnp.int32)}

  def host_fields(self, row):
    labels, length = row_labels(row, self.unit, self._need_vocab(),
                                max(bucket_lengths(self.config.data)), self.max_label_length)
    return {'labels': labels, 'label_length': np.asarray(length, np.int32)}

  @property
  def _dropout(self) -> bool:
    return self.enc_cfg.has_dropout

  def init(self, rng):
    model = CtcModel(self.enc_cfg, len(self._need_vocab()), rngs=nnx.Rngs(params=rng))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    extra = {'step': jnp.zeros((), jnp.int32), 'prune': self.prune.init_state(params)}
    return model, extra

  def targets(self, batch) -> tuple[jax.Array, jax.Array]:
    """Label ids `[B, U]` and lengths `[B]` (-1 = not in the loss) of the batch's rows."""
    labels, lengths = batch['labels'], batch['label_length']  # [B, U], [B]
    ok = (batch['index'] >= 0) & (lengths > 0)
    if 'valid' in batch:
      ok &= batch['valid']
    if 'offset' in batch:
      ok &= batch['offset'] == 0  # a cropped window no longer matches the transcript
    return labels, jnp.where(ok, lengths, -1)

  def loss_fn(self, model: CtcModel, extra_state, batch, rng):
    m = self.config.method
    wav, wav_mask = batch['audio'], batch['audio_mask']  # [B, S]
    mask_rng, drop_rng = jax.random.split(rng)
    model = self.prune.forward_model(model, extra_state['prune'])
    out_kw = dict(deterministic=not self._dropout, rngs=drop_rng if self._dropout else None)
    masked = None
    if float(m.mask_prob) > 0:
      frames = self.enc_cfg.frame_lengths(jnp.sum(wav_mask, axis=-1))  # [B]
      t = self.enc_cfg.num_frames(wav.shape[1])
      frame_mask = jnp.arange(t)[None, :] < frames[:, None]  # [B, T]
      masked = masking.span_mask(mask_rng, frame_mask, float(m.mask_prob), int(m.mask_length))
    out = model.encoder(wav, wav_mask, mask_time_indices=masked, **out_kw)
    h = out.last_hidden_state  # [B, T, D]
    # fairseq freeze_finetune_updates: only the head learns during the first updates.
    frozen = extra_state['step'] < int(m.freeze_encoder_steps)
    h = jnp.where(frozen, jax.lax.stop_gradient(h), h)
    logits = model.head(h).astype(jnp.float32)  # [B, T, V]
    labels, lengths = self.targets(batch)
    per_seq, feasible = ctc_loss(logits, out.frame_mask, labels, jnp.maximum(lengths, 0))
    use = (lengths > 0) & feasible  # [B]
    usef = use.astype(jnp.float32)
    n_used = jnp.maximum(jnp.sum(usef), 1.0)
    loss = jnp.sum(jnp.where(use, per_seq, 0.0)) / n_used
    n_tokens = jnp.maximum(jnp.sum(jnp.where(use, lengths, 0)), 1).astype(jnp.float32)
    best = jnp.argmax(logits, axis=-1)  # [B, T]
    valid_frames = out.frame_mask & use[:, None]
    metrics = {
      'ctc_loss': loss,
      'ctc_loss_per_token': jnp.sum(jnp.where(use, per_seq, 0.0)) / n_tokens,
      'used_fraction': jnp.mean(usef),
      'blank_fraction': jnp.sum((best == 0) & valid_frames) / jnp.maximum(jnp.sum(valid_frames),
                                                                         1),
    }
    # The pruning step of a pruned run makes no update (see jaxspeech.methods.parp); the value
    # reported stays the loss.
    scale = self.prune.gradient_scale(extra_state['prune'])
    loss = scale * loss + jax.lax.stop_gradient((1.0 - scale) * loss)
    return loss, (metrics, extra_state)

  def post_update(self, params, extra_state, step):
    params, prune_state = self.prune.post_update(params, extra_state['prune'], step,
                                                 int(self.config.train.num_steps))
    return params, {**extra_state, 'step': step + 1, 'prune': prune_state}

  def predict_fns(self, model, extra_state):
    fns = super().predict_fns(model, extra_state)
    model = self.prune.forward_model(model, extra_state['prune'])
    fns['logits'] = lambda wav, mask: model(wav, mask)
    return fns


def _all_split_rows(data_config) -> list[dict]:
  """Every row of the configured manifest (all splits): the phone inventory spans them."""
  from data_pipelines.manifest import read_manifest

  path = str(data_config.manifest)
  if not path:
    from data_pipelines.synth import built_in_corpus
    path = built_in_corpus(str(data_config.cache_dir) or None,
                           num_utterances=int(data_config.builtin_utterances))
  return read_manifest(path)
