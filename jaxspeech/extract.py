"""Feature extraction: hidden states (or discrete units) of a checkpoint for a list of audio files.

    python -m jaxspeech.extract --checkpoint DIR --audio a.wav b.flac --layers all --out f.npz
    python -m jaxspeech.extract --checkpoint SPIN_WORKDIR --audio a.wav b.flac --units --out u.npz
    python -m jaxspeech.extract --checkpoint SPIN_WORKDIR --audio a.wav --units --out units.txt
    python -m jaxspeech.extract --checkpoint DINOSR_WORKDIR --audio a.wav --units --layers -1 \
      --out u.npz

`--checkpoint` is an HF checkpoint folder (config.json + weights) or a jaxspeech training workdir
(its config.json and latest checkpoint: the speech encoder, `Method.encoder`, of a Spin, DinoSR,
HuBERT-style... run).

Features: one float32 array [T, D] per file and layer under the key "<file stem>/layer_<i>",
i = 0..L: exactly HF transformers' `hidden_states[i]` (`output_hidden_states=True`) of the
checkpoint's feature extractor's output.
Units (`--units`, a workdir whose method predicts 'units', `Method.predict_fns`: Spin's codeword
ids argmax(z Cᵀ), DinoSR's nearest codeword of one target layer given as `--layers L`): one int32
array [T] of per-frame unit ids per file under the key "<file stem>"; an `--out` ending in `.txt`
gets one line per file instead, "<stem> id id id ...".
`--out` is written exactly at the path given (an .npz archive whatever the name: `--out
feats.bin` writes `feats.bin`, which `np.load` reads; numpy's own `savez` would add `.npz`),
atomically (a temporary file renamed when complete), and the path written is printed.
Audio is read with soundfile, averaged to mono and resampled to 16 kHz with scipy's polyphase
`resample_poly`, then normalised per file to zero mean / unit variance as in training
(`jaxspeech.audio.normalize_waveform`): always for a workdir, for an HF folder as its
`preprocessor_config.json`'s `do_normalize` says (normalised without one, the
Wav2Vec2FeatureExtractor default). Files are grouped by length and padded to a few bucket
lengths after normalising (padding is exact in jaxspeech's encoder, so this changes no number and
bounds the number of compilations).
User errors (a bad file: missing, unreadable, empty, NaN/inf; a bad `--layers`; a checkpoint that
is missing, of another architecture or with a garbage config.json; an `--out` that is a directory)
print one line `PROG: error: ...` naming the file or flag and exit with code 2
(`jaxspeech.errors.run_cli`); nothing is written then. Only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import errors
from jaxspeech.audio import SAMPLE_RATE, AudioError, load_audio, normalize_waveform

PROG = "python -m jaxspeech.extract"
BUCKET = SAMPLE_RATE  # pad to whole seconds


class ExtractError(errors.UserError, ValueError):
  """A flag or checkpoint this command cannot use; the message names it."""


def parse_layers(spec: str, num_layers: int) -> list[int]:
  """'all' -> 0..L; '3' or '0,6,12' -> those (negative counts from the end)."""
  if spec == "all":
    return list(range(num_layers + 1))
  try:
    layers = [int(s) for s in spec.split(",") if s.strip()]
  except ValueError:
    raise ExtractError(
      f"--layers must be 'all' or comma-separated integers, got {spec!r}") from None
  out = []
  for i in layers:
    j = i + num_layers + 1 if i < 0 else i
    if not 0 <= j <= num_layers:
      raise ExtractError(f"--layers: layer {i} out of range 0..{num_layers}")
    out.append(j)
  if not out:
    raise ExtractError("--layers is empty")
  return out


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_model(checkpoint: str, label: str | None = None):
  """The SpeechEncoder of an HF checkpoint directory or of a jaxspeech workdir's model
  (`Method.encoder`). Errors name the source as `label` (default `--checkpoint CHECKPOINT`)."""
  from jaxspeech.interop import hf
  from jaxspeech.train.checkpoint import load_workdir_model
  from jaxspeech.workdir import check_workdir_config

  label = label or f"--checkpoint {checkpoint}"
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"{label}: no such directory")
  if not is_workdir(checkpoint):
    return hf.load_encoder(checkpoint)  # its errors name the folder's files
  check_workdir_config(os.path.abspath(checkpoint), label)
  method, model, config, _ = load_workdir_model(checkpoint, label=label)
  encoder = method.encoder(model)
  if encoder is None:
    raise ExtractError(f"{label}: the {config.method.name} model has no speech encoder")
  return encoder


def input_normalized(checkpoint: str) -> bool:
  """Whether the checkpoint's model takes per-utterance normalised waveforms: a workdir's always
  (the trainer always normalises), an HF folder's as its preprocessor config says."""
  from jaxspeech.interop import hf

  return is_workdir(checkpoint) or hf.feature_extractor_normalizes(checkpoint)


def _load_wavs(files: Sequence[str], normalize: bool) -> list[np.ndarray]:
  wavs = [load_audio(f) for f in files]  # raises AudioError naming a bad file
  return [normalize_waveform(w) for w in wavs] if normalize else wavs


def load_units_context(checkpoint: str):
  """The EvalContext of a workdir whose method predicts 'units' (`Method.predict_fns`)."""
  from jaxspeech.workdir import load_context

  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
  if not is_workdir(checkpoint):
    raise ExtractError(f"--units: {checkpoint} is not a jaxspeech workdir (an HF encoder folder "
                       "has no codebook)")
  ctx = load_context(checkpoint)
  if "units" not in ctx.predict:
    raise ExtractError(f"--units: the {ctx.method.name} model of {checkpoint} has no discrete "
                       f"units (its predictions are {sorted(ctx.predict)}; use e.g. a Spin or "
                       "DinoSR workdir)")
  return ctx


def _batches(wavs, batch_size: int, min_samples: int):
  """Length-sorted batches padded to whole seconds: (indices, wav [b, S], mask [b, S])."""
  order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    s = -(-max(len(wavs[i]) for i in idx) // BUCKET) * BUCKET
    s = max(s, min_samples)  # at least one frame
    batch = np.zeros((len(idx), s), np.float32)
    mask = np.zeros((len(idx), s), bool)
    for r, i in enumerate(idx):
      batch[r, : len(wavs[i])] = wavs[i]
      mask[r, : len(wavs[i])] = True
    yield idx, jnp.asarray(batch), jnp.asarray(mask)


def _stems(files: Sequence[str]) -> list[str]:
  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  dup = sorted({s for s in stems if stems.count(s) > 1})
  if dup:
    raise ExtractError(f"--audio: several files share the stem(s) {dup}; output keys would "
                       "collide")
  return stems


def extract_units(
  units_fn,
  files: Sequence[str],
  batch_size: int = 8,
  normalize: bool = True,
  layer: int | None = None,
) -> dict[str, np.ndarray]:
  """Returns {"<stem>": [T] int32 unit ids} for every file: `units_fn(wav, mask, layer)` (a
  method's 'units' prediction; `layer` None = the method's default). `normalize`: feed each file
  normalised (`normalize_waveform`), as the workdir's model was trained."""
  stems = _stems(files)
  wavs = _load_wavs(files, normalize)
  run = jax.jit(lambda w, m: units_fn(w, m) if layer is None else units_fn(w, m, layer))
  result = {}
  for idx, wav, mask in _batches(wavs, batch_size, BUCKET):
    try:
      units, frame_mask = run(wav, mask)
    except ValueError as e:  # the method rejects the layer, e.g. DinoSR's layer without codebook
      if errors.is_user_error(e):
        raise
      raise ExtractError(f"--units: {e}") from e
    units, frames = np.asarray(units), np.asarray(frame_mask).sum(-1)
    for r, i in enumerate(idx):
      if frames[r] < 1:
        raise AudioError(f"{files[i]}: too short for one frame ({len(wavs[i])} samples)")
      result[stems[i]] = units[r, : frames[r]].astype(np.int32)
  return result


def extract(
  model, files: Sequence[str], layers: Sequence[int], batch_size: int = 8, normalize: bool = True
) -> dict[str, np.ndarray]:
  """Returns {"<stem>/layer_<i>": [T, D] float32} for every file and layer; `normalize`: feed each
  file normalised (`normalize_waveform`; see `input_normalized`)."""
  stems = _stems(files)
  wavs = _load_wavs(files, normalize)
  cfg = model.config
  top = max(layers)

  @jax.jit
  def run(wav, mask):
    out = model(wav, mask, num_layers=top)
    return out.hidden_states

  result = {}
  for idx, wav, mask in _batches(wavs, batch_size, sum(cfg.conv_kernel)):
    hidden = run(wav, mask)
    for r, i in enumerate(idx):
      t = cfg.num_frames(len(wavs[i]))
      if t < 1:
        raise AudioError(f"{files[i]}: too short for one frame ({len(wavs[i])} samples)")
      for layer in layers:
        result[f"{stems[i]}/layer_{layer}"] = np.asarray(hidden[layer][r, :t], np.float32)
  return result


def write_output(out: str, feats: dict[str, np.ndarray], units_text: bool = False) -> str:
  """Writes `feats` at exactly `out` (an .npz archive, or with `units_text` one line
  "<stem> id id ..." per file) through a temporary file renamed when complete; returns the path
  written."""
  if os.path.isdir(out):
    raise ExtractError(f"--out {out}: is a directory (give a file name)")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f"{out}.tmp{os.getpid()}"
  try:
    with open(tmp, "w" if units_text else "wb") as f:
      if units_text:
        for stem, ids in feats.items():
          f.write(stem + " " + " ".join(str(int(i)) for i in ids) + "\n")
      else:
        np.savez(f, **feats)  # a file object: no ".npz" appended
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns its exit code (0, or 2 after one `error:` line for a user error;
  argparse exits 2 itself for a bad flag)."""
  return errors.run_cli(_main, argv, prog=PROG)


def _main(argv: Sequence[str] | None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="HF checkpoint directory or jaxspeech workdir")
  p.add_argument("--audio", nargs="+", required=True, help="audio files (any soundfile format)")
  p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
  p.add_argument("--units", action="store_true",
                 help="per-frame unit ids (a workdir whose method predicts units: Spin, DinoSR)")
  p.add_argument("--out", required=True,
                 help="output file, written at exactly this path: an .npz archive (or, with "
                 "--units and a name ending in .txt, text)")
  p.add_argument("--batch-size", type=int, default=8)
  args = p.parse_args(argv)
  if args.batch_size < 1:
    p.error(f"argument --batch-size: must be >= 1, got {args.batch_size}")
  if os.path.isdir(args.out):  # before the work, not after it
    raise ExtractError(f"--out {args.out}: is a directory (give a file name)")
  if args.units:
    ctx = load_units_context(args.checkpoint)
    layer = None
    if args.layers != "all":  # one layer: e.g. DinoSR has units per target layer
      encoder = ctx.method.encoder(ctx.model)
      layers = parse_layers(args.layers, encoder.config.num_hidden_layers)
      if len(layers) != 1:
        raise ExtractError(f"--units takes one layer, got --layers {args.layers}")
      layer = layers[0]
    feats = extract_units(ctx.predict["units"], args.audio, args.batch_size, normalize=True,
                          layer=layer)  # a workdir's model: normalised input, as in training
  else:
    model = load_model(args.checkpoint)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    feats = extract(model, args.audio, layers, args.batch_size,
                    normalize=input_normalized(args.checkpoint))
  path = write_output(args.out, feats, units_text=args.units and args.out.endswith(".txt"))
  print(f"wrote {len(feats)} arrays for {len(args.audio)} files to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
