"""Evaluation task `retrieval`: audio->image and image->audio retrieval on the paired rows of one
split, recall@k against chance, and how the two modalities use a shared codebook.

    config.evals.test = {task: 'retrieval', split: 'test'}
    python -m jaxspeech.evaluate --checkpoint WORKDIR --task retrieval --split test

The model gives `pair_embeddings` and `pair_similarity` (`Method.predict_fns`; e.g.
`jaxspeech.methods.cmcm`: cosine of the summaries + alpha x the code-matching similarity).

Galleries. Each clip (row) is one audio item; each distinct image is one visual item (rows that
share an image, e.g. FSDD x load_digits where ~359 test scans serve 1,000 test clips, give it
once; an image is identified by the row's `image_index`, else its `visual_features` path, else
its `image` values). audio->image (a2i): every audio item queries the visual items; image->audio
(i2a): every visual item queries the audio items.

Which retrieved item is correct:
  class-level (the main keys, when the rows have labels): an item of the query's class (same
    digit). The digit pairs are made by class only (`data_pipelines.av_pairs`): within a class
    the pairing is arbitrary, so the exact partner carries nothing the class does not.
  pair-level (keys 'pair/...'): only the query's own partner(s): a2i the image of the query's
    row; i2a every clip whose row has that image. The measure for naturally paired data (e.g.
    Places captions, rows without labels).
R@k = the fraction of queries with a correct item among the k most similar; ties are broken
against the query (a correct item at the same similarity as an incorrect one ranks below it),
so a constant similarity scores 0, not chance. Chance ('chance/...', 'pair/chance/...') is exact
for a uniformly random ranking: per query with r correct items among G,
1 - C(G - r, k) / C(G, k), averaged over the queries.

Returns (all floats):
  'a2i/R@1' 'a2i/R@5' 'a2i/R@10' 'i2a/R@1' ...          the model's retrieval similarity
  'summary/a2i/R@k' ..., 'codes/a2i/R@k' ...              its two parts alone (class-level)
  'chance/a2i/R@k' ..., 'pair/a2i/R@k' ..., 'pair/chance/a2i/R@k' ...
  'codebook/size'; 'codebook/used_audio', 'codebook/used_visual' (codewords that are the nearest
  one of >= 1 unit of that modality), 'codebook/used_both' (of both),
  'codebook/used_both_1pct' (codewords holding >= 1% of each modality's units),
  'codebook/same_class_1pct' (of those, how many have the same most frequent class in both
  modalities), 'codebook/ppl_audio', 'codebook/ppl_visual' (perplexity of the unit
  assignments); 'num_audio', 'num_images'.
Audio units are counted over every clip, visual units over the distinct images.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)
ITEM_KEYS = ('image_index', 'visual_features', 'image')  # what identifies a row's image
MODALITIES = ('audio', 'visual')
SHARE = 0.01  # 'used_both_1pct': a codeword holding at least this share of each modality's units


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks=KS) -> dict[int, float]:
  """R@k of similarities `sim [Q, G]` (higher = more similar) with correct items
  `relevant [Q, G]` bool: the fraction of queries whose best-scored correct item has fewer than
  k incorrect items scored at least as high (ties against the query). Every query needs a
  correct item."""
  sim, relevant = np.asarray(sim, np.float64), np.asarray(relevant, bool)
  if sim.shape != relevant.shape or sim.ndim != 2:
    raise ValueError(f'recall_at_k: sim {sim.shape} and relevant {relevant.shape} must be the '
                     'same [Q, G]')
  if not np.isfinite(sim).all():
    raise ValueError('recall_at_k: non-finite similarities')
  if not relevant.any(1).all():
    raise ValueError(f'recall_at_k: {int((~relevant.any(1)).sum())} queries have no correct item')
  best = np.where(relevant, sim, -np.inf).max(1)  # [Q]
  beaten = np.sum(~relevant & (sim >= best[:, None]), axis=1)  # [Q] incorrect items ranked above
  return {k: float(np.mean(beaten < k)) for k in ks}


def chance_recall_at_k(relevant: np.ndarray, ks=KS) -> dict[int, float]:
  """Expected R@k of a uniformly random ranking: per query 1 - C(G - r, k) / C(G, k) with r
  correct of G items, averaged over the queries."""
  relevant = np.asarray(relevant, bool)
  g = relevant.shape[1]
  r = relevant.sum(1).astype(np.float64)  # [Q]
  out = {}
  for k in ks:
    miss = np.ones_like(r)  # P(none of the first k is correct) = prod_i (G - r - i) / (G - i)
    for i in range(min(k, g)):
      miss *= np.maximum(g - r - i, 0.0) / (g - i)
    out[k] = float(np.mean(1.0 - miss))
  return out


def item_key(row: dict, index: int):
  """What identifies the image of a row (see the module docstring); the row itself if nothing."""
  for k in ITEM_KEYS:
    if k in row:
      v = row[k]
      return (k, tuple(v) if isinstance(v, list) else v)
  return ('row', index)


def embed_rows(ctx, rows: list[dict], batch_size: int = 250) -> dict[str, dict[str, np.ndarray]]:
  """`pair_embeddings` of every row, per modality: {'audio': {summary [N, E], code_dist [N, V],
  codes [N, T], mask [N, T]}, 'visual': {...}} as numpy arrays."""
  import jax

  from jaxspeech.eval.av_classification import row_batches

  fn = jax.jit(ctx.need('pair_embeddings'), static_argnums=1)
  out = {m: [] for m in MODALITIES}
  for n, batch in row_batches(ctx, rows, batch_size):
    for m in MODALITIES:
      out[m].append({k: np.asarray(v)[:n] for k, v in fn(batch, m).items()})
  return {m: {k: np.concatenate([b[k] for b in out[m]]) for k in out[m][0]} for m in MODALITIES}


def code_class_counts(codes: np.ndarray, mask: np.ndarray, labels: np.ndarray, num_codewords: int,
                      num_classes: int) -> np.ndarray:
  """`[V, K]` number of valid units assigned to each codeword in clips of each class.
  codes / mask `[N, T]`, labels `[N]` (rows with a label outside 0..K-1 are left out)."""
  codes, mask, labels = np.asarray(codes), np.asarray(mask, bool), np.asarray(labels)
  keep = mask & ((labels >= 0) & (labels < num_classes))[:, None]  # [N, T]
  lab = np.broadcast_to(labels[:, None], codes.shape)
  out = np.zeros((num_codewords, num_classes), np.int64)
  np.add.at(out, (codes[keep], lab[keep]), 1)
  return out


def codebook_stats(codes: dict, masks: dict, labels: dict, num_codewords: int) -> dict[str, float]:
  """Usage of one codebook by the two modalities (the 'codebook/...' keys of the module
  docstring). Each argument maps 'audio' / 'visual' to `[N_m, T_m]` codes and masks and `[N_m]`
  labels (-1 = none)."""
  hist = {m: np.bincount(np.asarray(codes[m])[np.asarray(masks[m], bool)],
                         minlength=num_codewords).astype(np.float64) for m in MODALITIES}
  share = {m: hist[m] / max(hist[m].sum(), 1.0) for m in MODALITIES}
  out = {'codebook/size': float(num_codewords)}
  for m in MODALITIES:
    out[f'codebook/used_{m}'] = float(np.sum(hist[m] > 0))
    p = share[m][share[m] > 0]
    out[f'codebook/ppl_{m}'] = float(np.exp(-np.sum(p * np.log(p))))
  out['codebook/used_both'] = float(np.sum((hist['audio'] > 0) & (hist['visual'] > 0)))
  both = (share['audio'] >= SHARE) & (share['visual'] >= SHARE)
  out['codebook/used_both_1pct'] = float(both.sum())
  k = int(max(np.max(labels['audio'], initial=-1), np.max(labels['visual'], initial=-1))) + 1
  if k > 0:
    cc = {m: code_class_counts(codes[m], masks[m], labels[m], num_codewords, k)
          for m in MODALITIES}
    same = np.argmax(cc['audio'], 1) == np.argmax(cc['visual'], 1)
    out['codebook/same_class_1pct'] = float(np.sum(both & same))
  return out


def retrieval_metrics(ctx, rows: list[dict], batch_size: int = 250,
                      ks=KS) -> tuple[dict[str, float], dict]:
  """The task's metrics and the arrays behind them: {'emb': embed_rows(...) restricted to the
  audio items and the visual items, 'labels': {'audio' [N], 'visual' [M]}, 'sim' [N, M]}."""
  import jax

  from jaxspeech.eval.registry import EvalError

  if not rows:
    raise EvalError('retrieval: no rows to evaluate')
  sim_fn = jax.jit(ctx.need('pair_similarity'), static_argnums=2)
  emb = embed_rows(ctx, rows, batch_size)
  keys = [item_key(r, i) for i, r in enumerate(rows)]
  first = {}
  for i, k in enumerate(keys):
    first.setdefault(k, i)
  vis = np.asarray(sorted(first.values()))  # rows giving the distinct images
  emb['visual'] = {k: v[vis] for k, v in emb['visual'].items()}
  labels_a = np.asarray([int(r.get('label', -1)) for r in rows])
  labels = {'audio': labels_a, 'visual': labels_a[vis]}
  key_id = {k: j for j, k in enumerate(first)}  # image -> its column
  owner = np.asarray([key_id[k] for k in keys])  # [N] the column of each clip's own image

  def sim(part):
    s = np.asarray(sim_fn(emb['audio'], emb['visual'], part), np.float64)  # [N, M]
    if not np.isfinite(s).all():
      raise EvalError(f'retrieval: non-finite {part} similarities')
    return s

  s = {part: sim(part) for part in ('combined', 'summary', 'codes')}
  out = {}
  rel_pair = owner[:, None] == np.arange(len(vis))[None, :]  # [N, M]
  relevance = {'pair/': rel_pair}
  if (labels_a >= 0).all():
    relevance[''] = labels['audio'][:, None] == labels['visual'][None, :]
  for prefix, rel in relevance.items():
    # Class-level: the retrieval similarity and its two parts; pair-level: the similarity only.
    parts = {'': 'combined'} if prefix else {'': 'combined', 'summary/': 'summary',
                                               'codes/': 'codes'}
    for d, r in (('a2i', rel), ('i2a', rel.T)):
      for name, part in parts.items():
        sm = s[part] if d == 'a2i' else s[part].T
        for k, x in recall_at_k(sm, r, ks).items():
          out[f'{prefix}{name}{d}/R@{k}'] = x
      for k, x in chance_recall_at_k(r, ks).items():
        out[f'{prefix}chance/{d}/R@{k}'] = x
  v = emb['audio']['code_dist'].shape[1]
  out.update(codebook_stats({m: emb[m]['codes'] for m in MODALITIES},
                            {m: emb[m]['mask'] for m in MODALITIES}, labels, v))
  out['num_audio'], out['num_images'] = float(len(rows)), float(len(vis))
  return out, {'emb': emb, 'labels': labels, 'sim': s['combined']}


def run(ctx, split: str = 'test', manifest: str = '', batch_size: int = 250) -> dict[str, float]:
  ctx.need('pair_embeddings')
  ctx.need('pair_similarity')
  rows = ctx.rows(split, manifest)
  return retrieval_metrics(ctx, rows, batch_size)[0]
