"""Feature extraction: hidden states of an encoder checkpoint for a list of audio files.

    python -m jaxspeech.extract --checkpoint DIR --audio a.wav b.flac --layers all --out f.npz

Writes one float32 array [T, D] per file and layer under the key "<file stem>/layer_<i>",
i = 0..L: exactly HF transformers' `hidden_states[i]` (`output_hidden_states=True`). Audio is
read with soundfile, averaged to mono and resampled to 16 kHz with scipy's polyphase
`resample_poly`. Files are grouped by length and padded to a few bucket lengths (padding is exact
in jaxspeech's encoder, so this changes no number and bounds the number of compilations).
A bad file (missing, unreadable, empty, NaN/inf) stops the run with its name; exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.audio import SAMPLE_RATE, AudioError, load_audio

BUCKET = SAMPLE_RATE  # pad to whole seconds


def parse_layers(spec: str, num_layers: int) -> list[int]:
  """'all' -> 0..L; '3' or '0,6,12' -> those (negative counts from the end)."""
  if spec == "all":
    return list(range(num_layers + 1))
  try:
    layers = [int(s) for s in spec.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--layers must be 'all' or comma-separated integers, got {spec!r}") from None
  out = []
  for i in layers:
    j = i + num_layers + 1 if i < 0 else i
    if not 0 <= j <= num_layers:
      raise ValueError(f"--layers: layer {i} out of range 0..{num_layers}")
    out.append(j)
  if not out:
    raise ValueError("--layers is empty")
  return out


def load_model(checkpoint: str):
  """An encoder from an HF checkpoint directory."""
  from jaxspeech.interop import hf

  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
  return hf.load_encoder(checkpoint)


def extract(
  model, files: Sequence[str], layers: Sequence[int], batch_size: int = 8
) -> dict[str, np.ndarray]:
  """Returns {"<stem>/layer_<i>": [T, D] float32} for every file and layer."""
  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  dup = sorted({s for s in stems if stems.count(s) > 1})
  if dup:
    raise ValueError(f"several input files share the stem(s) {dup}; output keys would collide")
  wavs = [load_audio(f) for f in files]  # raises AudioError naming a bad file
  cfg = model.config
  top = max(layers)

  @jax.jit
  def run(wav, mask):
    out = model(wav, mask, num_layers=top)
    return out.hidden_states

  result = {}
  order = sorted(range(len(files)), key=lambda i: len(wavs[i]))
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    s = -(-max(len(wavs[i]) for i in idx) // BUCKET) * BUCKET
    s = max(s, sum(cfg.conv_kernel))  # at least one frame
    batch = np.zeros((len(idx), s), np.float32)
    mask = np.zeros((len(idx), s), bool)
    for r, i in enumerate(idx):
      batch[r, : len(wavs[i])] = wavs[i]
      mask[r, : len(wavs[i])] = True
    hidden = run(jnp.asarray(batch), jnp.asarray(mask))
    for r, i in enumerate(idx):
      t = cfg.num_frames(len(wavs[i]))
      if t < 1:
        raise AudioError(f"{files[i]}: too short for one frame ({len(wavs[i])} samples)")
      for layer in layers:
        result[f"{stems[i]}/layer_{layer}"] = np.asarray(hidden[layer][r, :t], np.float32)
  return result


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m jaxspeech.extract", description=__doc__.split("\n")[0]
  )
  p.add_argument("--checkpoint", required=True, help="HF checkpoint directory")
  p.add_argument("--audio", nargs="+", required=True, help="audio files (any soundfile format)")
  p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
  p.add_argument("--out", required=True, help="output .npz")
  p.add_argument("--batch-size", type=int, default=8)
  args = p.parse_args(argv)
  try:
    model = load_model(args.checkpoint)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    feats = extract(model, args.audio, layers, args.batch_size)
  except (AudioError, ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, **feats)
  print(f"wrote {len(feats)} arrays for {len(args.audio)} files to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
