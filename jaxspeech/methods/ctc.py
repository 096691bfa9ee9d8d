"""CTC fine-tuning of a pretrained speech encoder (wav2vec 2.0 recipe), with optional pruning.

    waveform [B, S] -> SpeechEncoder -> [B, T, D] -> Linear D->V -> CTC (optax.ctc_loss, blank 0)

Targets are character or phone sequences of the manifest rows (`config.method.unit`):
  char   fairseq's letter targets: lower-cased a-z and the apostrophe, '|' between words; other
         characters (punctuation) are dropped. WER/CER on the text these tokens spell.
  phone  the row's `phones` (space-separated), silence '_' dropped; the inventory is every phone
         of the whole manifest (all splits), sorted. PER on these tokens.

Labels reach the jitted step without a data-pipeline change: the method builds a padded label
table `[N, U]` (one row per manifest row the trainer reads, `train.data.manifest_rows`) on the
host, and the loss gathers it with the batch's `index` (row index; -1 = filler). Utterances
longer than `config.data.num_samples` would be cropped by the pipeline and lose their
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

from jaxspeech.layers.attention import dense
from jaxspeech.layers.partitioning import EMBED, VOCAB
from jaxspeech.methods.base import Method, encoder_config
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
  raise ValueError(f'config.method.unit={unit!r}: choose one of {UNITS}')


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
  raise ValueError(f'config.method.unit={unit!r}: choose one of {UNITS}')


def label_table(rows: Sequence[dict], unit: str, vocab: Vocab,
                max_samples: int) -> tuple[np.ndarray, np.ndarray]:
  """Padded label ids `[N, U]` (0 in padding) and lengths `[N]`; length -1 marks rows left out
  of the loss (no reference, or longer than `max_samples` at 16 kHz so the pipeline crops it)."""
  seqs, lengths = [], []
  for r in rows:
    ids = vocab.encode(reference_tokens(r, unit))
    n16k = -(-int(r['n_samples']) * 16000 // int(r.get('sample_rate', 16000)))
    seqs.append(ids)
    lengths.append(len(ids) if ids and n16k <= max_samples else -1)
  u = max([len(s) for s in seqs] + [1])
  table = np.zeros((len(rows), u), np.int32)
  for i, s in enumerate(seqs):
    table[i, :len(s)] = s
  return table, np.asarray(lengths, np.int32)


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


def _manifest_path(data_config) -> str:
  path = str(data_config.manifest)
  if path:
    return path
  from data_pipelines.synth import built_in_corpus
  return built_in_corpus(str(data_config.cache_dir) or None,
                         num_utterances=int(data_config.builtin_utterances))


class CtcFinetuning(Method):
  """CTC fine-tuning (+ optional magnitude pruning: none / omp / imp / mpi / parp)."""

  name = 'ctc'

  def __init__(self, config, with_labels: bool = True):
    super().__init__(config)
    from data_pipelines.manifest import read_manifest

    self.enc_cfg = encoder_config(config.model)
    m = config.method
    self.unit = str(m.unit)
    self.vocab = build_vocab(read_manifest(_manifest_path(config.data)), self.unit)
    from jaxspeech.methods.parp import PruneSpec  # parp.py subclasses this class: import late

    self.prune = PruneSpec.from_config(config)
    self.labels = self.label_lengths = None
    if with_labels:
      from jaxspeech.train import data as data_lib

      # The very rows (and order) the trainer's pipeline indexes with batch['index'].
      rows = data_lib.manifest_rows(config.data)
      self.labels, self.label_lengths = label_table(rows, self.unit, self.vocab,
                                                    int(config.data.num_samples))
      if not np.any(self.label_lengths > 0):
        raise ValueError(f'ctc: no training row has a {self.unit} reference that fits '
                         f'config.data.num_samples={int(config.data.num_samples)}')

  @property
  def _dropout(self) -> bool:
    return self.enc_cfg.has_dropout

  def init(self, rng):
    model = CtcModel(self.enc_cfg, len(self.vocab), rngs=nnx.Rngs(params=rng))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    extra = {'step': jnp.zeros((), jnp.int32), 'prune': self.prune.init_state(params)}
    return model, extra

  def targets(self, batch) -> tuple[jax.Array, jax.Array]:
    """Label ids `[B, U]` and lengths `[B]` (-1 = not in the loss) of the batch's rows."""
    if self.labels is None:
      raise ValueError('CtcFinetuning(with_labels=False) cannot compute a training loss')
    n = self.labels.shape[0]
    idx = batch['index']  # [B]
    safe = jnp.clip(idx, 0, n - 1)
    labels = jnp.asarray(self.labels)[safe]  # [B, U]
    lengths = jnp.asarray(self.label_lengths)[safe]  # [B]
    ok = (idx >= 0) & (lengths > 0)
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
