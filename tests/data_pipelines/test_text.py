"""Unpaired text: lexicon (espeak-ng), silence insertion, transcript overlap removal, rare-phone
filter, the manifest / stats / LM files."""

import json

import numpy as np
import pytest

from data_pipelines import text


def test_sentences_to_phones_silence_probability():
  lex = {'a': ['p'], 'b': ['t', 'k'], 'c': ['s']}
  sents = ['A b, c.'] * 400
  never = text.sentences_to_phones(sents, lex, 0.0, seed=0)
  assert never[0] == ['_', 'p', 't', 'k', 's', '_']
  always = text.sentences_to_phones(sents, lex, 1.0, seed=0)
  assert always[0] == ['_', 'p', '_', 't', 'k', '_', 's', '_']
  half = text.sentences_to_phones(sents, lex, 0.5, seed=0)
  inner = np.mean([s[1:-1].count('_') for s in half])  # 2 gaps a sentence, p = 0.5 each
  assert abs(inner - 1.0) < 0.1
  assert half == text.sentences_to_phones(sents, lex, 0.5, seed=0)
  assert text.sentences_to_phones(['a b'], lex, 0.0, 0, surround='end') == [['p', 't', 'k', '_']]
  assert text.sentences_to_phones(['a b'], lex, 0.0, 0, surround='none') == [['p', 't', 'k']]
  with pytest.raises(ValueError, match='surround'):
    text.sentences_to_phones(['a'], lex, 0.0, 0, surround='start')


def test_write_text_manifest_removes_transcripts_and_rare_phones(tmp_path):
  audio = tmp_path / 'audio.jsonl'
  row = {'n_samples': 16000, 'sample_rate': 16000, 'speaker': 's'}
  audio.write_text(''.join(json.dumps({'path': f'{i}.wav', **row, 'text': t}) + '\n'
                           for i, t in enumerate(['The cat sat.', 'A dog ran!'])))
  sents = ['the cat sat', 'THE CAT SAT?', 'a dog ran', 'a cat ran', 'the dog sat'] * 3 + \
    ['zoo']  # 'zoo' brings phones (z, u) seen once only -> dropped with its sentence
  out = tmp_path / 'text' / 'text.jsonl'
  stats = text.write_text_manifest(str(out), sents, sil_prob=0.0, seed=0, min_phone_count=2,
                                   exclude_manifest=str(audio))
  assert stats['overlap_found'] == 9 and stats['overlap_remaining'] == 0
  assert stats['sentences_out'] == 6 and 'z' in stats['dropped_rare_phones']
  seqs = text.read_text_manifest(str(out))
  assert len(seqs) == 6 and all(s[0] == s[-1] == '_' and '_' not in s[1:-1] for s in seqs)
  lex = json.load(open(tmp_path / 'text' / 'text.lexicon.json'))
  assert lex['cat'] == ['k', '{', 't']  # espeak-ng mb-us1, canonical phones
  rows = [json.loads(line) for line in open(out)]
  assert {r['text'] for r in rows} == {'a cat ran', 'the dog sat'}
  from jaxspeech.eval.phone_lm import PhoneLM

  lm = PhoneLM.load(str(tmp_path / 'text' / 'text.lm.json'))
  assert '_' not in lm.vocab and set(lm.vocab) == {p for s in seqs for p in s} - {'_'}


def test_read_text_manifest_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    text.read_text_manifest(str(tmp_path / 'nope.jsonl'))
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"phones": "a b"}\n{"text": "x"}\n')
  with pytest.raises(ValueError, match='bad.jsonl:2'):
    text.read_text_manifest(str(bad))
  with pytest.raises(ValueError, match='sil_prob'):
    text.write_text_manifest(str(tmp_path / 'x.jsonl'), ['a'], sil_prob=2.0)
