r"""Unit-quality evaluation of a checkpoint's features on a manifest; prints one JSON line.

    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task units --layer L --k K
    python -m jaxspeech.evaluate --checkpoint DIR --manifest M --task units --layer last --codebook
    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task abx --layer L
    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task speaker_probe --layer L
    python -m jaxspeech.evaluate --checkpoint DIR --manifest M --task ctc [--split test]

Tasks and output:
  units          k-means (`jaxspeech.ops.kmeans`, K clusters, 50 Lloyd iterations from k-means++,
                 on raw features as HuBERT's recipe; `--standardize` z-scores them first) of
                 layer L, fitted on the evaluated frames or, with `--fit_split S`, on the frames
                 of the manifest's split S (fairseq fits k-means on training data and labels
                 held-out sets with it: `--split test --fit_split train`), or with
                 `--codebook` the model's own DinoSR codebook of layer L, scored against 50 Hz
                 frame phone labels: {"pnmi", "phone_purity", "cluster_purity"}, plus
                 "speaker_nmi" (the share of the speaker entropy the units explain; lower = more
                 speaker-invariant) given >= 2 speakers.
  abx            ZeroSpeech-style ABX error (%) on phone segments in context (triphones), DTW on
                 cosine distance: {"abx_within", "abx_across"}.
  speaker_probe  linear speaker classifier on utterance-mean features, accuracy on held-out
                 utterances of the same speakers: {"accuracy"}.
  ctc            greedy CTC decoding of a ctc/parp training workdir: {"per"} (phone model) or
                 {"wer", "cer"} (character model).

`--checkpoint` is an HF checkpoint directory (config.json + weights), a jaxspeech training workdir
(its `config.json` and latest checkpoint), or `mfcc` (39-d MFCC + deltas at 50 Hz, the HuBERT
iteration-1 features; `--layer` is ignored). Encoders get their input as in training: every
utterance normalised to zero mean / unit variance (`jaxspeech.audio.normalize_waveform`) before
padding -- always for a workdir (the training pipeline always normalises), for an HF directory
as its `preprocessor_config.json`'s `do_normalize` says (normalised without one, the
Wav2Vec2FeatureExtractor default); MFCCs get the raw waveform. `--layer` is a hidden-state
index (0 = transformer input, HF `hidden_states` convention; negative counts from the end) or
`last`.
Frame phone labels come from the manifest's `alignment` rows (frame t = phone covering its
centre at 50 Hz); `--split` keeps only rows of one split (e.g. `test`, the held-out speakers of
the built-in corpus). Errors (missing checkpoint, rows without alignments for units/abx, ...) are
printed to stderr with exit code 1.

`--codebook` assigns frames the way DinoSR's targets are made: layer L's output (its feed-forward
output before the residual add, or the block output, as the run's `method.target_output`) of the EMA
teacher (the student's CNN and projection, the teacher's transformer, unmasked input; all tasks of
that run use the teacher) instance-normalised over each utterance, then the nearest codeword of
that layer's codebook; only layers among the method's top-K target layers have one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.audio import SAMPLE_RATE, AudioError, load_audio, normalize_waveform

TASKS = ('units', 'abx', 'speaker_probe', 'ctc')
BUCKET = SAMPLE_RATE  # pad utterances to whole seconds: few compilations
FRAME_RATE = 50


class EvalError(Exception):
  """A user-facing error (bad input); the CLI prints it and exits with code 1."""


# ---------------------------------------------------------------------------------------------
# Feature extractors: `(wav [B, S], mask [B, S]) -> (features [B, T, D], frame_mask [B, T])`.


class Features:
  """What a checkpoint gives: frame features of a layer, and optionally DinoSR codebook units.

  `normalize`: `utterance_outputs` feeds each utterance normalised (`normalize_waveform`), the
  input the model was trained on."""

  num_layers: int = 0
  normalize: bool = True
  frames_of = None  # samples -> frames

  def features(self, wav, mask, layer: int):
    raise NotImplementedError

  def codebook_units(self, wav, mask, layer: int):
    raise EvalError('--codebook needs a jaxspeech workdir of a method with codebooks (dinosr)')


class MfccFeatures(Features):
  """39-d Kaldi MFCC + deltas + delta-deltas at 50 Hz (`jaxspeech.methods.hubert`)."""

  normalize = False  # HuBERT's iteration-1 targets are MFCCs of the raw waveform

  def __init__(self):
    from jaxspeech.models.speech_encoder import EncoderConfig

    self.cfg = EncoderConfig.preset('tiny')  # only its conv geometry: 20 ms frames, 25 ms field

  def frames_of(self, n: int) -> int:
    return self.cfg.num_frames(n)

  def features(self, wav, mask, layer):
    from jaxspeech.methods.hubert import mfcc_targets_features

    t = self.cfg.num_frames(wav.shape[1])
    fn = jax.jit(lambda w: mfcc_targets_features(w, t))
    lengths = self.cfg.frame_lengths(jnp.sum(mask, -1))
    return fn(wav), jnp.arange(t)[None, :] < lengths[:, None]


class EncoderFeatures(Features):
  """Hidden states of a SpeechEncoder (plus a DinoSR codebook when the workdir has one)."""

  def __init__(self, encoder, codebooks=None, num_target_layers: int = 0, normalize: bool = True,
               target_output: str = 'block'):
    self.encoder = encoder
    self.target_output = target_output  # what the codebooks cluster (DinoSR's target_output)
    self.normalize = normalize
    self.cfg = encoder.config
    self.num_layers = self.cfg.num_hidden_layers
    self.codebooks = codebooks
    self.k = num_target_layers
    self._run = {}

  def frames_of(self, n: int) -> int:
    return self.cfg.num_frames(n)

  def _hidden(self, wav, mask, layer, block_output=False):
    """`hidden_states[layer]`; for the last layer the final hidden state (after the final
    LayerNorm of pre-LN models) unless `block_output`."""
    key = (layer, block_output)
    if key not in self._run:
      encoder, final = self.encoder, layer == self.num_layers and not block_output

      @jax.jit
      def run(w, m):
        out = encoder(w, m, num_layers=max(layer, 1))
        return (out.last_hidden_state if final else out.hidden_states[layer]), out.frame_mask

      self._run[key] = run
    return self._run[key](wav, mask)

  def _ffn(self, wav, mask, layer):
    """Feed-forward output of block `layer` (1-based) before its residual add, `[B, T, D]`."""
    key = (layer, 'ffn')
    if key not in self._run:
      encoder = self.encoder

      @jax.jit
      def run(w, m):
        x, _, frame_mask = encoder.embed(w, m, deterministic=True)
        _, _, ffn = encoder.encoder(x, frame_mask, num_layers=layer, return_ffn=True)
        return ffn[layer - 1], frame_mask

      self._run[key] = run
    return self._run[key](wav, mask)

  def features(self, wav, mask, layer):
    return self._hidden(wav, mask, layer)

  def codebook_units(self, wav, mask, layer):
    from jaxspeech.ops import codebook as cb
    from jaxspeech.ops import distillation

    if self.codebooks is None:
      return super().codebook_units(wav, mask, layer)
    first = self.num_layers - self.k + 1
    if not first <= layer <= self.num_layers:
      raise EvalError(f'--codebook: layer {layer} has no codebook (the target layers are '
                      f'{first}..{self.num_layers})')
    i = layer - first
    state = cb.CodebookState(self.codebooks.sums[i], self.codebooks.counts[i])
    if self.target_output == 'ffn':  # layer L's feed-forward output before its residual add
      h, fmask = self._ffn(wav, mask, layer)
    else:  # block outputs (hidden_states), also for the last layer
      h, fmask = self._hidden(wav, mask, layer, block_output=True)
    y = distillation.instance_norm_over_time(h, fmask)
    ids, _ = cb.nearest_codeword(y, cb.codebook_embeddings(state))
    return ids, fmask


def _restore_extra(workdir: str, abstract_state):
  """`extra` (teacher, codebooks, ...) of a workdir's latest checkpoint (other items skipped).

  The restore target is the configured train state's shapes with every item but `extra` a
  placeholder, so no checkpoint metadata is needed."""
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'data'))
  step = mngr.latest_step()
  target = {k: jax.tree.map(lambda _: ocp.PLACEHOLDER, v) for k, v in abstract_state.items()
            if k != 'extra'}
  target['extra'] = abstract_state['extra']
  restored = mngr.restore(step, args=ocp.args.Composite(
    state=ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding) if hasattr(a, 'sharding')
      else ocp.RestoreArgs(), target))))
  mngr.close()
  return restored['state']['extra']


def load_workdir(workdir: str, with_codebook: bool) -> EncoderFeatures:
  from jaxspeech.train.checkpoint import load_workdir_model

  if not os.path.exists(os.path.join(workdir, 'config.json')):
    raise EvalError(f'--checkpoint {workdir}: has checkpoints/ but no config.json')
  method, model, config, setup = load_workdir_model(workdir)
  encoder = model
  for key in method.encoder_path:
    encoder = getattr(encoder, key)
  codebooks, k = None, 0
  if with_codebook:
    extra = _restore_extra(workdir, setup.abstract_state)
    if not isinstance(extra, dict) or 'codebooks' not in extra:
      raise EvalError(f'--codebook: {workdir} ({config.method.name}) has no DinoSR codebooks')
    from jaxspeech.ops import codebook as cb
    c = extra['codebooks']
    codebooks = c if isinstance(c, cb.CodebookState) else cb.CodebookState(
      c['sums'] if isinstance(c, dict) else c[0], c['counts'] if isinstance(c, dict) else c[1])
    k = int(codebooks.counts.shape[0])
    if isinstance(extra.get('teacher'), dict):
      # The codebooks hold statistics of the EMA teacher's outputs: assign with the teacher's
      # transformer (the student's drifts from it by up to one EMA horizon).
      from flax import nnx

      params = nnx.state(encoder.encoder, nnx.Param)
      nnx.replace_by_pure_dict(params, extra['teacher'])
      nnx.update(encoder.encoder, params)
  # The trainer always normalises its input (`jaxspeech.train.data` calls `make_dataset` with its
  # default normalize=True; the config has no key to turn it off), so a workdir's model is too.
  return EncoderFeatures(encoder, codebooks, k, normalize=True,
                         target_output=getattr(method, 'target_output', 'block'))


def load_checkpoint(checkpoint: str, with_codebook: bool = False) -> Features:
  """`mfcc`, an HF checkpoint directory or a jaxspeech workdir -> a feature extractor."""
  if checkpoint == 'mfcc':
    if with_codebook:
      raise EvalError('--codebook: the mfcc baseline has no codebook')
    return MfccFeatures()
  if not os.path.isdir(checkpoint):
    raise EvalError(f'--checkpoint {checkpoint}: no such directory (nor "mfcc")')
  if os.path.isdir(os.path.join(checkpoint, 'checkpoints')):
    return load_workdir(os.path.abspath(checkpoint), with_codebook)  # Orbax needs absolute
  if os.path.exists(os.path.join(checkpoint, 'config.json')):
    if with_codebook:
      raise EvalError('--codebook: an HF checkpoint has no DinoSR codebook')
    from jaxspeech.interop import hf
    return EncoderFeatures(hf.load_encoder(checkpoint),
                           normalize=hf.feature_extractor_normalizes(checkpoint))
  raise EvalError(f'--checkpoint {checkpoint}: neither a jaxspeech workdir (no checkpoints/) nor '
                  'an HF checkpoint directory (no config.json)')


def parse_layer(spec: str, num_layers: int) -> int:
  if spec == 'last':
    return num_layers
  try:
    i = int(spec)
  except ValueError:
    raise EvalError(f"--layer must be an integer or 'last', got {spec!r}") from None
  j = i + num_layers + 1 if i < 0 else i
  if not 0 <= j <= num_layers:
    raise EvalError(f'--layer {spec}: out of range 0..{num_layers}')
  return j


# ---------------------------------------------------------------------------------------------
# Corpus -> per-utterance frame features.


def load_rows(manifest: str, split: str, need_alignment: bool) -> list[dict]:
  from data_pipelines.manifest import read_manifest

  if not os.path.exists(manifest):
    raise EvalError(f'--manifest {manifest}: no such file')
  rows = read_manifest(manifest)
  if split:
    rows = [r for r in rows if r.get('split') == split]
  if not rows:
    raise EvalError(f'--manifest {manifest}: no rows' + (f' with split={split!r}' if split else ''))
  if need_alignment:
    missing = [r.get('id', r['path']) for r in rows if not r.get('alignment')]
    if missing:
      raise EvalError(f'--manifest {manifest}: {len(missing)} rows have no `alignment` (frame '
                      f'phone labels are needed for this task), e.g. {missing[:3]}')
  return rows


def load_wavs(rows: Sequence[dict]) -> list[np.ndarray]:
  """The rows' audio; a bad file (missing, empty, NaN, wrong rate) is an EvalError naming it."""
  try:
    return [load_audio(r['path']) for r in rows]
  except AudioError as e:
    raise EvalError(str(e)) from None


def utterance_outputs(extractor: Features, wavs: Sequence[np.ndarray], fn, batch_size: int = 8):
  """Runs `fn(wav, mask) -> ([B, T, ...], frame_mask)` over length-sorted, bucket-padded batches;
  returns one `[T_i, ...]` numpy array per utterance (valid frames only). Each utterance is
  normalised first (over its own samples, before padding) when `extractor.normalize`."""
  if extractor.normalize:
    wavs = [normalize_waveform(w) for w in wavs]
  out = [None] * len(wavs)
  order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    s = max(-(-max(len(wavs[i]) for i in idx) // BUCKET) * BUCKET, BUCKET)
    wav = np.zeros((batch_size, s), np.float32)  # fixed batch size: one compilation per bucket
    mask = np.zeros((batch_size, s), bool)
    for r, i in enumerate(idx):
      wav[r, :len(wavs[i])] = wavs[i]
      mask[r, :len(wavs[i])] = True
    vals, _ = fn(jnp.asarray(wav), jnp.asarray(mask))
    vals = np.asarray(vals)
    for r, i in enumerate(idx):
      t = extractor.frames_of(len(wavs[i]))
      if t < 1:
        raise EvalError(f'utterance {i}: too short for one frame ({len(wavs[i])} samples)')
      out[i] = vals[r, :t]
  return out


def frame_phone_labels(rows: Sequence[dict], num_frames: Sequence[int]) -> list[np.ndarray]:
  from data_pipelines import phones

  inventory = phones.inventory_from_alignments([r['alignment'] for r in rows])
  phone_to_id = {p: i for i, p in enumerate(inventory)}
  return [phones.frame_labels(r['alignment'], t, FRAME_RATE, phone_to_id)
          for r, t in zip(rows, num_frames)]


# ---------------------------------------------------------------------------------------------
# Tasks.


def task_units(extractor, wavs, rows, layer, k, use_codebook, seed=0, kmeans_iters=50,
               standardize=False, return_units=False, fit_wavs=None):
  """Units (k-means of layer `layer`, or the model's codebook) scored against the frame phones:
  {"pnmi", "phone_purity", "cluster_purity"}, plus "speaker_nmi" (I(speaker; unit) / H(speaker),
  `jaxspeech.eval.units.speaker_nmi`) when the rows hold >= 2 speakers. k-means runs on the raw
  features, as HuBERT's recipe (fairseq `learn_kmeans.py`); `standardize` z-scores every
  dimension first (statistics of the fitted frames). k-means is fitted on the frames of
  `fit_wavs` when given (e.g. the training speakers, as fairseq fits `learn_kmeans.py` on training
  data and labels other sets with that model), else on the evaluated frames themselves; the
  evaluated frames are then assigned to the nearest centroid. With `return_units`, also the
  per-utterance unit arrays."""
  from jaxspeech.eval.units import speaker_nmi, unit_quality
  from jaxspeech.ops import kmeans

  if use_codebook:
    units = utterance_outputs(extractor, wavs,
                              lambda w, m: extractor.codebook_units(w, m, layer))
  else:
    def layer_features(ws):
      return utterance_outputs(extractor, ws, lambda w, m: extractor.features(w, m, layer))

    feats = layer_features(wavs)
    x = np.concatenate(feats).astype(np.float32)
    x_fit = x if fit_wavs is None else np.concatenate(layer_features(fit_wavs)).astype(np.float32)
    if len(x_fit) < k:
      raise EvalError(f'--k {k}: only {len(x_fit)} frames to cluster')
    if standardize:
      mean, std = x_fit.mean(0), x_fit.std(0) + 1e-5
      x, x_fit = (x - mean) / std, (x_fit - mean) / std
    fit = jax.jit(kmeans.kmeans_fit, static_argnums=(2, 3))
    centroids, _ = fit(jnp.asarray(x_fit), None, k, kmeans_iters, jax.random.key(seed))
    ids = np.asarray(kmeans.kmeans_assign(jnp.asarray(x), centroids)[0])
    units = np.split(ids, np.cumsum([len(f) for f in feats])[:-1])
  labels = frame_phone_labels(rows, [len(u) for u in units])
  y, u = np.concatenate(labels), np.concatenate(units)
  r = unit_quality(y, u, y >= 0)
  out = {'pnmi': r['pnmi'], 'phone_purity': r['phone_purity'],
         'cluster_purity': r['cluster_purity']}
  speakers = np.concatenate([[row.get('speaker', '')] * len(v) for row, v in zip(rows, units)])
  if len(set(speakers.tolist())) >= 2:
    out['speaker_nmi'] = speaker_nmi(speakers, u)
  return (out, units) if return_units else out


def task_abx(extractor, wavs, rows, layer, max_items_per_cell=5, seed=0):
  from jaxspeech.eval.abx import abx_error, phone_segments

  feats = utterance_outputs(extractor, wavs, lambda w, m: extractor.features(w, m, layer))
  labels = frame_phone_labels(rows, [len(f) for f in feats])
  items, ys, ctx, spk = [], [], [], []
  for f, lab, row in zip(feats, labels, rows):
    for s, e, y, c in phone_segments(lab.tolist()):
      if y < 0 or min(c) < 0:
        continue
      items.append(np.asarray(f[s:e], np.float32))
      ys.append(y)
      ctx.append(c)
      spk.append(row['speaker'])
  if not items:
    raise EvalError('abx: no phone segment in context found in the manifest')
  r = abx_error(items, ys, ctx, spk, metric='cosine', max_frames=32,
                max_items_per_cell=max_items_per_cell, seed=seed)
  return {'abx_within': r['abx_within'], 'abx_across': r['abx_across']}


def task_speaker_probe(extractor, wavs, rows, layer, seed=0):
  from jaxspeech.eval.speaker_probe import speaker_probe, split_by_speaker

  feats = utterance_outputs(extractor, wavs, lambda w, m: extractor.features(w, m, layer))
  x = np.stack([f.astype(np.float32).mean(0) for f in feats])  # [N, D] utterance means
  speakers = np.array([r['speaker'] for r in rows])
  train, test = split_by_speaker(speakers, seed=seed)
  if len(test) == 0 or len(np.unique(speakers)) < 2:
    raise EvalError('speaker_probe: need at least 2 speakers with 2+ utterances each')
  r = speaker_probe(x[train], speakers[train], x[test], speakers[test], seed=seed)
  return {'accuracy': r['accuracy']}


def evaluate(checkpoint: str, manifest: str, task: str, layer: str = 'last', k: int = 50,
             codebook: bool = False, split: str = '', seed: int = 0,
             standardize: bool = False, fit_split: str = '') -> dict[str, float]:
  if task not in TASKS:
    raise EvalError(f'--task {task!r}: choose one of {TASKS}')
  if codebook and task != 'units':
    raise EvalError('--codebook only applies to --task units')
  if fit_split and (task != 'units' or codebook):
    raise EvalError('--fit_split only applies to --task units with k-means (not --codebook)')
  if task == 'ctc':
    from jaxspeech.eval.asr import evaluate_ctc
    return evaluate_ctc(checkpoint, manifest, split)
  rows = load_rows(manifest, split, need_alignment=task in ('units', 'abx'))
  extractor = load_checkpoint(checkpoint, codebook)
  li = parse_layer(layer, extractor.num_layers) if checkpoint != 'mfcc' else 0
  wavs = load_wavs(rows)
  if task == 'units':
    fit_wavs = load_wavs(load_rows(manifest, fit_split, False)) if fit_split else None
    return task_units(extractor, wavs, rows, li, k, codebook, seed, standardize=standardize,
                      fit_wavs=fit_wavs)
  if task == 'abx':
    return task_abx(extractor, wavs, rows, li, seed=seed)
  return task_speaker_probe(extractor, wavs, rows, li, seed)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m jaxspeech.evaluate',
                              description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='HF dir, jaxspeech workdir, or mfcc')
  p.add_argument('--manifest', required=True, help='JSONL manifest')
  p.add_argument('--task', required=True, choices=TASKS)
  p.add_argument('--layer', default='last', help="hidden-state index or 'last'")
  p.add_argument('--k', type=int, default=50, help='k-means clusters (units)')
  p.add_argument('--codebook', action='store_true', help="units: the model's DinoSR codebook")
  p.add_argument('--split', default='', help="only manifest rows with this split ('' = all)")
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--standardize', action='store_true',
                 help='units: z-score each feature dimension before k-means (default: raw)')
  p.add_argument('--fit_split', default='',
                 help="units: fit k-means on the manifest rows of this split (e.g. train) and "
                 "assign the evaluated rows ('' = fit on the evaluated rows)")
  args = p.parse_args(argv)
  try:
    result = evaluate(args.checkpoint, args.manifest, args.task, args.layer, args.k,
                      args.codebook, args.split, args.seed, args.standardize, args.fit_split)
  except (EvalError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(json.dumps({k: float(v) for k, v in result.items()}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
