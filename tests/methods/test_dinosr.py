"""DinoSR mechanics on tiny shapes (teacher, codebooks, masked-only loss) and a short training
run on synthetic speech whose prediction accuracy must rise far above chance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import dinosr as exp
from jaxspeech.errors import ConfigError
from jaxspeech.methods import dinosr
from jaxspeech.ops import codebook as cb
from jaxspeech.ops import masking, pruning

SMALL_MODEL = {
  'hidden_size': 32, 'num_hidden_layers': 3, 'num_attention_heads': 2, 'intermediate_size': 64,
  'conv_dim': (32,) * 7, 'num_conv_pos_embeddings': 16, 'num_conv_pos_embedding_groups': 4,
}


def small_config(**method):
  c = exp.get_config('tiny')
  for k, v in SMALL_MODEL.items():
    c.model[k] = v
  c.data.num_samples = 8000
  c.method.average_top_k_layers = 2
  c.method.codebook_size = 16
  for k, v in method.items():
    c.method[k] = v
  return c


def batch(b=4, s=8000, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([s, s - 1600, s, s - 3200][:b])
  return {'audio': jnp.asarray(0.1 * rng.normal(size=(b, s)).astype(np.float32)),
          'audio_mask': jnp.asarray(np.arange(s)[None] < lengths[:, None])}


def test_teacher_starts_as_student_and_gets_no_gradient():
  method = dinosr.DinosrPretraining(small_config())
  model, extra = method.init(jax.random.key(0))
  student = dinosr.transformer_params(model)
  for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(extra['teacher'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Perturb the teacher so it differs from the student, then differentiate w.r.t. both.
  extra['teacher'] = jax.tree.map(lambda x: x * 1.01, extra['teacher'])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  data = batch()

  def loss(p, teacher):
    m = nnx.merge(graphdef, p, rest)
    return method.loss_fn(m, {**extra, 'teacher': teacher}, data, jax.random.key(1))[0]

  g_student, g_teacher = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, extra['teacher'])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_teacher))
  g_tr = nnx.to_pure_dict(g_student)['encoder']['encoder']
  assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(g_tr))) > 0.0
  g_cnn = nnx.to_pure_dict(g_student)['encoder']['feature_extractor']
  assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(g_cnn))) > 0.0


def test_post_update_is_ema_of_the_transformer_with_linear_decay():
  config = small_config(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10, ema_skip=())
  method = dinosr.DinosrPretraining(config)
  model, extra = method.init(jax.random.key(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = jax.tree.map(lambda x: x + 1.0, params)  # the student moved by +1 everywhere
  for step, decay in ((0, 0.9), (5, 0.945), (10, 0.99), (50, 0.99)):
    p2, e2 = method.post_update(params, extra, jnp.asarray(step))
    assert p2 is params
    for t_new, t_old in zip(jax.tree.leaves(e2['teacher']), jax.tree.leaves(extra['teacher'])):
      np.testing.assert_allclose(np.asarray(t_new), np.asarray(t_old) + (1 - decay), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(e2['codebooks'].sums),
                                  np.asarray(extra['codebooks'].sums))
  # The configs' ema_skip=('pos_conv',): the positional conv is the student's, the rest EMA'd;
  # once the teacher is frozen (decay 1) nothing moves, as DinoSR stops stepping its EMAModule.
  config = small_config(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10,
                        freeze_teacher_step=20)
  method = dinosr.DinosrPretraining(config)
  assert method.ema_skip == ('pos_conv',)
  paths = [n for n, _ in pruning.named_leaves(extra['teacher'])]
  skipped = ['pos_conv' in p for p in paths]
  assert any(skipped) and not all(skipped), paths
  student = jax.tree.leaves(params['encoder']['encoder'])
  for step, decay in ((0, 0.9), (10, 0.99), (20, 1.0)):
    _, e2 = method.post_update(params, extra, jnp.asarray(step))
    for p, skip, s, t_new, t_old in zip(paths, skipped, student, jax.tree.leaves(e2['teacher']),
                                        jax.tree.leaves(extra['teacher'])):
      want = s if skip and decay < 1 else np.asarray(t_old) + (1 - decay)
      np.testing.assert_allclose(np.asarray(t_new), want, atol=1e-5, err_msg=p)
  with pytest.raises(ConfigError, match='no teacher parameter path'):
    dinosr.DinosrPretraining(small_config(ema_skip=('pos_cnov',))).init(jax.random.key(0))
  with pytest.raises(ConfigError, match='ema_skip'):
    dinosr.DinosrPretraining(small_config(ema_skip=('',)))
  # The paper variant freezes the teacher at 200k updates.
  paper = dinosr.DinosrPretraining(exp.get_config('paper'))
  assert float(paper.teacher_decay(199_999)) == pytest.approx(0.9999)
  assert float(paper.teacher_decay(200_000)) == 1.0
  assert float(paper.teacher_decay(15_000)) == pytest.approx(0.99945, abs=1e-7)


def test_codebooks_update_only_used_codewords_from_selected_frames():
  k, b, t, d, v = 2, 3, 12, 4, 8
  keys = jax.random.split(jax.random.key(0), k + 2)
  books = jax.vmap(lambda key: cb.init_codebook(key, v, d))(keys[:k])
  y = jax.random.normal(keys[k], (k, b, t, d))
  select = jax.random.bernoulli(keys[k + 1], 0.4, (b, t))
  codes, new = dinosr.assign_and_update(books, y, select, 0.9)
  for i in range(k):
    emb = np.asarray(cb.codebook_embeddings(cb.CodebookState(books.sums[i], books.counts[i])))
    dist = ((np.asarray(y[i])[..., None, :] - emb) ** 2).sum(-1)  # [B, T, V]
    np.testing.assert_array_equal(np.asarray(codes[i]), dist.argmin(-1))
    used = set(np.asarray(codes[i])[np.asarray(select)].tolist())
    assert 0 < len(used) < v
    for c in range(v):
      sel = np.asarray(select) & (np.asarray(codes[i]) == c)
      if c in used:
        want_n = 0.9 * float(books.counts[i, c]) + 0.1 * sel.sum()
        want_s = 0.9 * np.asarray(books.sums[i, c]) + 0.1 * np.asarray(y[i])[sel].sum(0)
        np.testing.assert_allclose(float(new.counts[i, c]), want_n, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(new.sums[i, c]), want_s, rtol=1e-5, atol=1e-6)
      else:
        np.testing.assert_array_equal(np.asarray(new.sums[i, c]), np.asarray(books.sums[i, c]))
        assert float(new.counts[i, c]) == float(books.counts[i, c])


def test_loss_uses_masked_frames_only():
  rng = np.random.default_rng(0)
  k, b, t, v = 2, 2, 10, 5
  logits = jnp.asarray(rng.normal(size=(k, b, t, v)).astype(np.float32))
  codes = jnp.asarray(rng.integers(0, v, size=(k, b, t)))
  select = jnp.asarray(rng.random((b, t)) < 0.5)
  loss, per_layer, acc = dinosr.masked_prediction_loss(logits, codes, select)
  lp = np.asarray(jax.nn.log_softmax(logits, -1))
  s = np.asarray(select)
  want = [-np.take_along_axis(lp[i], np.asarray(codes[i])[..., None], -1)[..., 0][s].mean()
          for i in range(k)]
  np.testing.assert_allclose(np.asarray(per_layer), want, rtol=1e-5)
  assert float(loss) == pytest.approx(np.mean(want), rel=1e-5)
  hits = [(lp[i].argmax(-1) == np.asarray(codes[i]))[s].mean() for i in range(k)]
  assert float(acc) == pytest.approx(np.mean(hits), rel=1e-6)
  # Anything at unselected frames changes nothing.
  noise = jnp.asarray(rng.normal(size=(k, b, t, v)).astype(np.float32)) * 10
  logits2 = jnp.where(select[None, ..., None], logits, noise)
  codes2 = jnp.where(select[None], codes, (codes + 1) % v)
  loss2, _, acc2 = dinosr.masked_prediction_loss(logits2, codes2, select)
  assert float(loss2) == float(loss) and float(acc2) == float(acc)


def test_loss_fn_metrics_and_codebook_state():
  method = dinosr.DinosrPretraining(small_config())
  model, extra = method.init(jax.random.key(0))
  loss, (metrics, new_extra) = jax.jit(method.loss_fn)(model, extra, batch(), jax.random.key(2))
  # Untrained heads: about log(V) (V=16).
  assert abs(float(loss) - np.log(16)) < 0.5
  # The configs' fairseq masking: the loss masks exactly `span_mask(style='fairseq')` of its key.
  b = batch()
  _, _, frame_mask = model.encoder.embed(b['audio'], b['audio_mask'])
  want = masking.span_mask(jax.random.split(jax.random.key(2), 3)[0], frame_mask, 0.8, 10,
                           style='fairseq')
  assert len(set(np.asarray(want).sum(-1).tolist())) == 1  # require_same_masks
  assert float(metrics['masked_fraction']) == pytest.approx(
    float(want.sum() / frame_mask.sum()), rel=1e-6)
  exact = dinosr.DinosrPretraining(small_config(mask_style='exact'))
  _, (m_exact, _) = jax.jit(exact.loss_fn)(model, extra, b, jax.random.key(2))
  assert 0.5 < float(m_exact['masked_fraction']) < 0.65  # p=0.8, span 10 -> 56.6% of frames
  for i in range(2):
    assert 1.0 <= float(metrics[f'codebook_ppl_{i}']) <= 16.0
  for a, b in zip(jax.tree.leaves(new_extra['teacher']), jax.tree.leaves(extra['teacher'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # it moves in post_update only
  changed = np.asarray(new_extra['codebooks'].counts != extra['codebooks'].counts)
  assert changed.any() and not changed.all()


@pytest.mark.parametrize('target_output', ['ffn', pytest.param('block', marks=pytest.mark.slow)])
def test_evaluate_codebook_units_are_the_training_targets(target_output):
  """`jaxspeech.evaluate`'s `--codebook` units of a layer equal the targets the loss assigns to
  that layer (teacher on unmasked input, FFN or block outputs, instance norm, nearest codeword),
  with a teacher that differs from the student."""
  from jaxspeech import evaluate

  method = dinosr.DinosrPretraining(small_config(target_output=target_output))
  model, extra = method.init(jax.random.key(0))
  teacher = jax.tree.map(lambda w: w + 0.05 * jnp.sin(jnp.arange(w.size).reshape(w.shape) + 1.0),
                         extra['teacher'])  # a teacher != the student
  b = batch()
  x, _, frame_mask = model.encoder.embed(b['audio'], b['audio_mask'])
  outs = dinosr.run_teacher(model, teacher, x, frame_mask, method.num_layers, target_output)
  targets = dinosr.dinosr_targets(outs, frame_mask, method.k)  # [K, B, T, D]
  codes, _ = dinosr.assign_and_update(extra['codebooks'], targets, frame_mask, 0.9)  # [K, B, T]
  # The evaluation side: the teacher's weights in the encoder, as load_workdir does.
  params = nnx.state(model.encoder.encoder, nnx.Param)
  nnx.replace_by_pure_dict(params, teacher)
  nnx.update(model.encoder.encoder, params)
  feats = evaluate.EncoderFeatures(model.encoder, extra['codebooks'], method.k, normalize=False,
                                   target_output=target_output)
  for i, layer in enumerate(range(method.num_layers - method.k + 1, method.num_layers + 1)):
    ids, fmask = feats.codebook_units(b['audio'], b['audio_mask'], layer)
    np.testing.assert_array_equal(np.asarray(fmask), np.asarray(frame_mask))
    valid = np.asarray(frame_mask)
    np.testing.assert_array_equal(np.asarray(ids)[valid], np.asarray(codes[i])[valid])
  # The two target kinds give different units (the test can tell them apart).
  other = 'block' if target_output == 'ffn' else 'ffn'
  feats_other = evaluate.EncoderFeatures(model.encoder, extra['codebooks'], method.k,
                                         normalize=False, target_output=other)
  ids_o, _ = feats_other.codebook_units(b['audio'], b['audio_mask'], method.num_layers)
  assert (np.asarray(ids_o)[valid] != np.asarray(codes[-1])[valid]).any()


def test_codebook_units_on_training_windows():
  """`eval_window_samples`: units on consecutive windows of W samples have the whole input's
  frames (count, frame mask), each window's units are those of running that window alone, and a
  window of at least the input's length is the whole-utterance output."""
  config = small_config()
  method = dinosr.DinosrPretraining(config)
  assert method.eval_window_samples == config.data.num_samples  # -1 = the training crop
  assert dinosr.DinosrPretraining(small_config(eval_window_samples=0)).eval_window_samples == 0
  model, extra = method.init(jax.random.key(0))
  s, w = 9600, 4000
  b = batch(s=s)
  layer = method.num_layers
  whole = jax.jit(lambda x, m: method.units_fn(model, extra, 0)(x, m, layer))
  ids, fmask = whole(b['audio'], b['audio_mask'])
  ids_big, fmask_big = method.units_fn(model, extra, s + 320)(b['audio'], b['audio_mask'], layer)
  np.testing.assert_array_equal(np.asarray(ids_big), np.asarray(ids))
  np.testing.assert_array_equal(np.asarray(fmask_big), np.asarray(fmask))
  ids_w, fmask_w = method.units_fn(model, extra, w)(b['audio'], b['audio_mask'], layer)
  assert ids_w.shape == ids.shape == (4, 29)
  np.testing.assert_array_equal(np.asarray(fmask_w), np.asarray(fmask))
  f = method.enc_cfg.num_frames(w)  # 12 frames per window, hop 12 * 320 samples
  hop = f * 320
  valid = np.asarray(fmask)
  for k in range(3):  # windows of 12, 12 and 5 frames
    seg = slice(hop * k, hop * k + w)
    x = jnp.pad(b['audio'][:, seg], ((0, 0), (0, w - b['audio'][:, seg].shape[1])))
    m = jnp.pad(b['audio_mask'][:, seg], ((0, 0), (0, w - b['audio_mask'][:, seg].shape[1])))
    ids_k, fmask_k = whole(x, m)
    frames = slice(f * k, min(f * (k + 1), 29))
    n = frames.stop - frames.start
    np.testing.assert_array_equal(np.asarray(fmask_k)[:, :n], valid[:, frames])
    np.testing.assert_array_equal(np.where(valid[:, frames], np.asarray(ids_w)[:, frames], -1),
                                  np.where(valid[:, frames], np.asarray(ids_k)[:, :n], -1))
  # Windows change the units (instance norm and positional conv over the window).
  assert (np.asarray(ids_w)[valid] != np.asarray(ids)[valid]).any()


def test_dead_codeword_restart_in_loss_fn():
  """With `codebook_restart_patience`, codewords idle for that many steps are reset to selected
  target frames; everything else is exactly the reference update (patience 0, no idle state)."""
  ref = dinosr.DinosrPretraining(small_config(codebook_restart_patience=0))
  method = dinosr.DinosrPretraining(small_config(codebook_restart_patience=2))
  model, extra = method.init(jax.random.key(0))
  _, extra_ref = ref.init(jax.random.key(0))
  assert 'codebook_idle' not in extra_ref and extra['codebook_idle'].shape == (2, 16)
  step, step_ref = jax.jit(method.loss_fn), jax.jit(ref.loss_fn)
  e, e_ref = extra, extra_ref
  unused = np.ones((2, 16), bool)  # unused in every step so far
  for i in range(2):
    loss, (_, e_new) = step(model, e, batch(), jax.random.key(2 + i))
    loss_ref, (_, e_ref_new) = step_ref(model, {**e_ref, 'codebooks': e['codebooks']}, batch(),
                                        jax.random.key(2 + i))
    assert float(loss) == float(loss_ref)  # same targets: restarts come after the assignment
    cnt_ref, cnt = np.asarray(e_ref_new['codebooks'].counts), np.asarray(e_new['codebooks'].counts)
    used = np.asarray(e_ref_new['codebooks'].sums != e['codebooks'].sums).any(-1)  # updated
    unused &= ~used
    restarted = np.asarray(e_new['codebooks'].sums != e_ref_new['codebooks'].sums).any(-1)
    if i == 0:
      assert not restarted.any()
      np.testing.assert_array_equal(np.asarray(e_new['codebook_idle']), unused.astype(int))
    else:  # idle for 2 steps: restarted with count 1 and idle 0; the others as the reference
      np.testing.assert_array_equal(restarted, unused)
      assert unused.any() and not unused.all()
      np.testing.assert_array_equal(cnt[unused], 1.0)
      np.testing.assert_array_equal(cnt[~unused], cnt_ref[~unused])
      np.testing.assert_array_equal(np.asarray(e_new['codebook_idle'])[unused], 0)
    e, e_ref = e_new, e_ref_new


def test_paper_config_values():
  c = exp.get_config('paper')
  m = c.method
  assert (m.average_top_k_layers, m.codebook_size, m.codebook_decay) == (8, 256, 0.9)
  assert (m.ema_decay, m.ema_end_decay, m.ema_anneal_end_step) == (0.999, 0.9999, 30_000)
  assert (m.freeze_teacher_step, m.mask_prob, m.mask_length) == (200_000, 0.8, 10)
  assert (m.codebook_init, m.codebook_restart_patience) == ('instance_norm', 0)  # reference
  # fairseq compute_mask_indices, ema_layers_only (pos_conv not EMA'd), units on training crops.
  assert (m.mask_style, tuple(m.ema_skip), m.eval_window_samples) == ('fairseq', ('pos_conv',), -1)
  assert dinosr.DinosrPretraining(c).eval_window_samples == c.data.num_samples == 250_000
  assert (c.optim.learning_rate, c.optim.b2, c.optim.weight_decay) == (5e-4, 0.98, 0.01)
  assert c.train.num_steps == 400_000 and c.optim.schedule == 'tri_stage'
  assert tuple(c.optim.tri_stage_ratios) == (0.03, 0.47, 0.50)  # base.yaml phase_ratio
  assert c.model.feat_proj_dropout == 0.0 and c.model.hidden_dropout == 0.1  # dropout_input 0
  # extractor_mode layer_norm, encoder_layerdrop 0.05, pos_conv_depth 5 / conv_pos 95.
  assert (c.model.feat_extract_norm, c.model.layerdrop) == ('layer', 0.05)
  assert (c.model.pos_conv_depth, c.model.num_conv_pos_embeddings) == (5, 19)
  with pytest.raises(ValueError, match='unknown variant'):
    exp.get_config('huge')
  c = exp.get_config('tiny')
  c.method.average_top_k_layers = 9
  with pytest.raises(ValueError, match='average_top_k_layers'):
    dinosr.DinosrPretraining(c)


def _train(c, steps: int) -> tuple[float, dict]:
  """Runs `steps` jitted steps of config `c` on one device: (mean loss of the first 5 steps,
  means of the metrics over the last 20)."""
  from jaxspeech.train import data as data_lib
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  method = dinosr.DinosrPretraining(c)
  mesh = partitioning.create_mesh(c.mesh, devices=jax.devices()[:1])
  setup = step_lib.build_setup(c, method, mesh)
  state = step_lib.create_train_state(setup, jax.random.key(0))
  it = data_lib.make_iterator(c, mesh)
  first = data_lib.to_global(next(it), mesh)
  step = step_lib.jit_train_step(setup, first)
  hist = []
  for i in range(steps):
    b = first if i == 0 else data_lib.to_global(next(it), mesh)
    state, m = step(state, {k: b[k] for k in first})
    hist.append({k: float(v) for k, v in m.items()})
  start = np.mean([h['loss'] for h in hist[:5]])
  return start, {k: np.mean([h[k] for h in hist[-20:]]) for k in hist[-1]}


@pytest.mark.slow  # default run < 20 min on 2 cores; loss/codebook have fast tests
def test_short_training_run_learns(tmp_path):
  """~150 steps on 20 synthetic utterances, block-output targets and the reference codebook
  mechanics (no dead-codeword restart): the loss falls from ~log V and the masked accuracy ends
  well above chance (1/V) and above the majority-class baseline (always the most frequent
  codeword; at 150 steps the margin over it is still small, ~0.03).

  The configs' FFN-output targets need more data and steps to show it (measured with restart on
  these 20 utterances at 150 steps: accuracy 0.054 vs majority 0.087; with the reference
  mechanics the codebooks collapse to ~9 of 64 codewords): `test_tiny_config_learns` (slow)."""
  from data_pipelines import synth

  try:
    synth.check_tools(synth.SPEAKERS[s].voice for s in ('us1', 'us3'))
  except RuntimeError as e:
    pytest.skip(str(e))
  manifest = synth.synthesize_corpus(tmp_path / 'c', 20, seed=3, voices=['us1', 'us3'])
  c = exp.get_config('tiny')
  c.data.manifest = manifest
  c.data.split = ''
  c.train.num_steps = 150
  c.optim.warmup_steps = 20
  c.method.ema_anneal_end_step = 150
  c.method.codebook_restart_patience = 0
  c.method.target_output = 'block'
  c.method.mask_style, c.method.ema_skip = 'exact', ()  # as measured (before issue 15)
  start, end = _train(c, 150)
  assert abs(start - np.log(64)) < 0.3
  assert end['loss'] < start - 1.0, (start, end['loss'])
  assert end['acc_masked'] > 5 / 64
  assert end['acc_masked'] > end['majority_baseline'] + 0.01, end


@pytest.mark.slow
def test_tiny_config_learns():
  """The `tiny` config with the mechanics it had before issue 15 (FFN targets, exact masking,
  EMA'd pos_conv, dead-codeword restart; 2000 steps on the built-in corpus, ~8 min): masked
  accuracy far above the majority baseline (the same run by `jaxspeech.main` logged 0.219 vs
  0.053 over steps 1976-2000), codebooks stay used. With the earlier 400-step schedule the margin
  was only 0.089 vs 0.069. The config's reference mechanics (restart off) are measured against
  these by `benchmarks/dinosr_ablation.py`."""
  from data_pipelines import synth

  try:
    synth.check_tools(synth.SPEAKERS[s].voice for s in synth.SPEAKERS)
  except RuntimeError as e:
    pytest.skip(str(e))
  c = exp.get_config('tiny')
  c.method.mask_style, c.method.ema_skip, c.method.codebook_restart_patience = 'exact', (), 10
  start, end = _train(c, int(c.train.num_steps))
  assert abs(start - np.log(64)) < 0.3
  assert end['acc_masked'] > end['majority_baseline'] + 0.05, end
  assert end['codebook_used_min'] > 0.5, end
