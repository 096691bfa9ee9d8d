r"""Unpaired text for wav2vec-U: sentences -> word lexicon (espeak-ng) -> phone sequences with
optional silence between words -> a text manifest and its phone LM.

    python -m data_pipelines.text --out DIR/text.jsonl --num-sentences 2000 --seed 1 \
        [--sil-prob 0.5] [--exclude-manifest AUDIO_MANIFEST]
    python -m data_pipelines.text --out DIR/text.jsonl --text-file sentences.txt

fairseq `scripts/prepare_text.sh` in small: words are phonemised one by one (G2P into a
lexicon; here espeak-ng's MBROLA `mb-us1` phones, mapped onto `data_pipelines.phones.US_PHONES`
as the synthetic audio's alignments are), phones seen fewer than `min_phone_count` times are
dropped with their sentences (prepare_text's rare-phone filter), and `phonemize_with_sil.py`
puts silence `_` between words with probability `sil_prob` and at both ends (`surround`: 'both';
'end' or 'none' for audio without leading silence). Sentences equal to
a transcript of `exclude_manifest` (case and punctuation ignored) are removed and counted: the
text must be unpaired.

Writes OUT (JSON lines {"id", "text", "phones": "p p p"}), OUT_STEM.stats.json (sentence, overlap
and phone counts), OUT_STEM.lm.json (a 4-gram phone LM of the silence-free sequences,
`jaxspeech.eval.phone_lm`) and OUT_STEM.lexicon.json (the word -> phones lexicon).
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from data_pipelines import phones as phones_lib
from data_pipelines.manifest import ManifestError
from jaxspeech.errors import run_cli

SILENCE = phones_lib.SILENCE


def normalize(sentence: str) -> str:
  """Lower case, letters / digits / apostrophes only, single spaces."""
  return ' '.join(re.findall(r"[a-z0-9']+", sentence.lower()))


def phonemize_words(words: Iterable[str], voice: str = 'us1',
                    lexicon: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
  """word -> phones (espeak-ng `mb-<voice>` .pho output, canonical phones, silence dropped);
  words already in `lexicon` are not phonemised again. Raises if espeak-ng is missing."""
  from data_pipelines.synth import parse_pho

  lexicon = dict(lexicon or {})
  todo = sorted({w for w in words if w not in lexicon})
  if todo and shutil.which('espeak-ng') is None:
    from data_pipelines.synth import MissingToolError

    raise MissingToolError('phonemising text needs espeak-ng (apt-get install espeak-ng '
                           f'mbrola mbrola-{voice}; scripts/setup.sh)')
  for w in todo:
    pho = subprocess.run(['espeak-ng', '-v', f'mb-{voice}', '-q', '--pho', w], check=True,
                         capture_output=True, text=True).stdout
    ph = [phones_lib.canonical_phone(p) for p, _ in parse_pho(pho)]
    ph = [p for p in ph if p != SILENCE]
    if not ph:
      raise RuntimeError(f'espeak-ng (mb-{voice}) printed no phones for the word {w!r}')
    lexicon[w] = ph
  return lexicon


SURROUND = ('both', 'end', 'none')


def sentences_to_phones(sentences: Sequence[str], lexicon: dict[str, list[str]],
                        sil_prob: float, seed: int, surround: str = 'both') -> list[list[str]]:
  """fairseq `phonemize_with_sil.py`: silence after each word but the last with probability
  `sil_prob`, and at the ends (`--surround`): 'both', only the 'end' (audio that starts with
  speech but ends in silence, as the built-in synthetic corpus), or 'none'."""
  if surround not in SURROUND:
    raise ValueError(f'surround={surround!r}: choose one of {SURROUND}')
  rng = np.random.default_rng(seed)
  out = []
  for s in sentences:
    words = normalize(s).split()
    seq = [SILENCE] if surround == 'both' else []
    draws = rng.random(len(words) - 1) if sil_prob > 0 and len(words) > 1 else None
    for i, w in enumerate(words):
      seq += lexicon[w]
      if draws is not None and i < len(draws) and draws[i] < sil_prob:
        seq.append(SILENCE)
    if surround != 'none':
      seq.append(SILENCE)
    out.append(seq)
  return out


def _stem(path: str) -> str:
  return os.path.splitext(path)[0]


def write_text_manifest(out: str, sentences: Sequence[str], *, sil_prob: float = 0.5,
                        seed: int = 0, voice: str = 'us1', min_phone_count: int = 10,
                        exclude_manifest: str | None = None, lm_order: int = 4,
                        surround: str = 'both') -> dict:
  """Writes the text manifest OUT and its .stats.json / .lm.json / .lexicon.json; returns the
  stats."""
  from jaxspeech.eval.phone_lm import PhoneLM

  if not 0 <= sil_prob <= 1:
    raise ValueError(f'sil_prob must be in [0, 1], got {sil_prob}')
  if os.path.isdir(out):
    raise IsADirectoryError(errno.EISDIR, 'a folder, not a text manifest file', out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  norm = [normalize(s) for s in sentences]
  keep = [i for i, s in enumerate(norm) if s]
  excluded: set[str] = set()
  if exclude_manifest:
    if not os.path.exists(exclude_manifest):
      raise FileNotFoundError(f'exclude_manifest {exclude_manifest!r}: no such file')
    from data_pipelines.manifest import read_manifest

    excluded = {normalize(r['text']) for r in read_manifest(exclude_manifest) if r.get('text')}
  overlap = [i for i in keep if norm[i] in excluded]
  keep = [i for i in keep if norm[i] not in excluded]

  lex_path = _stem(out) + '.lexicon.json'
  lexicon = json.load(open(lex_path)) if os.path.exists(lex_path) else {}
  lexicon = phonemize_words({w for i in keep for w in norm[i].split()}, voice, lexicon)
  with open(lex_path, 'w') as f:
    json.dump(lexicon, f, indent=0, sort_keys=True)

  seqs = sentences_to_phones([norm[i] for i in keep], lexicon, sil_prob, seed, surround)
  counts = collections.Counter(p for s in seqs for p in s if p != SILENCE)
  rare = sorted(p for p, n in counts.items() if n < min_phone_count)
  rows = [(i, s) for i, s in zip(keep, seqs) if not set(s) & set(rare)]
  with open(out, 'w') as f:
    for i, s in rows:
      f.write(json.dumps({'id': f'text{i:06d}', 'text': sentences[i], 'phones': ' '.join(s)})
              + '\n')
  no_sil = [[p for p in s if p != SILENCE] for _, s in rows]
  PhoneLM.fit(no_sil, order=lm_order).save(_stem(out) + '.lm.json')
  remaining = sum(norm[i] in excluded for i, _ in rows)
  stats = {
    'sentences_in': len(sentences), 'sentences_out': len(rows),
    'unique_sentences_out': len({norm[i] for i, _ in rows}),
    'overlap_found': len(overlap), 'overlap_removed': len(overlap), 'overlap_remaining': remaining,
    'excluded_transcripts': len(excluded), 'dropped_rare_phones': rare,
    'dropped_rare_sentences': len(seqs) - len(rows), 'sil_prob': sil_prob,
    'surround': surround, 'seed': seed,
    'voice': voice, 'lm_order': lm_order, 'words': len(lexicon),
    'phones': sorted({p for _, s in rows for p in s}),
    'phone_tokens': sum(len(s) for s in no_sil),
  }
  with open(_stem(out) + '.stats.json', 'w') as f:
    json.dump(stats, f, indent=1)
  return stats


def read_text_manifest(path: str) -> list[list[str]]:
  """The phone sequences of a text manifest, one list per line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'text manifest {path!r}: no such file')
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line)['phones'].split())
      except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ManifestError(f'{path}:{n}: not a text-manifest row with "phones" ({e})') from e
  return out


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m data_pipelines.text', description=__doc__.split(
    '\n')[0])
  p.add_argument('--out', required=True)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--text-file', help='one sentence a line')
  src.add_argument('--num-sentences', type=int, help='sentences of the built-in grammar')
  p.add_argument('--seed', type=int, default=1)
  p.add_argument('--sil-prob', type=float, default=0.5)
  p.add_argument('--surround', default='both', choices=SURROUND,
                 help='silence at both ends, only the end, or none')
  p.add_argument('--voice', default='us1')
  p.add_argument('--min-phone-count', type=int, default=10)
  p.add_argument('--lm-order', type=int, default=4)
  p.add_argument('--exclude-manifest', default='', help="audio manifest whose transcripts are "
                 "removed ('builtin' = the built-in corpus)")
  a = p.parse_args(argv)
  if not 0 <= a.sil_prob <= 1:
    p.error(f'--sil-prob={a.sil_prob}: must be in [0, 1]')
  if a.num_sentences is not None and a.num_sentences < 1:
    p.error(f'--num-sentences={a.num_sentences}: must be >= 1')
  if a.text_file:
    with open(a.text_file) as f:
      sentences = [line.strip() for line in f if line.strip()]
    if not sentences:
      p.error(f'--text-file {a.text_file}: holds no sentences')
  else:
    from data_pipelines.synth import generate_sentences

    sentences = generate_sentences(a.num_sentences, a.seed)
  excl = a.exclude_manifest
  if excl == 'builtin':
    from data_pipelines.synth import built_in_corpus

    excl = built_in_corpus()
  stats = write_text_manifest(a.out, sentences, sil_prob=a.sil_prob, seed=a.seed, voice=a.voice,
                              min_phone_count=a.min_phone_count, exclude_manifest=excl or None,
                              lm_order=a.lm_order, surround=a.surround)
  print(json.dumps(stats))
  return 0


if __name__ == '__main__':
  sys.exit(run_cli(main, prog='python -m data_pipelines.text'))
