"""Cross-modal discrete representation learning with Cross-Modal Code Matching (CMCM; Liu et al.,
ACL 2022, SEEDS §9) on paired audio-visual rows, as one Method.

Model (`jaxspeech.models.cmcm_nets.CrossModalEncoder`): per modality a transformer stage giving
fine-grained units `[B, T, Q]` and an L2-normalised summary embedding `[B, E]`. Non-trainable
state (`extra_state['codebook']`, the way DinoSR carries its codebooks): ONE codebook `[V, Q]`
shared by both modalities, `jaxspeech.ops.vq.EMACodebookState` as a dict {codebook,
cluster_size, embed_sum}, initialised N(0, 1) (the units are standardised, norm sqrt(Q)).

Loss (all ops from `jaxspeech.ops.vq`; one shared trainer gives grads / optax / guards):
  summary   symmetric InfoNCE on the summaries of the batch's pairs (`summary_info_nce`): logits
            z^A_i . z^B_j / `temperature`, the matched pair on the diagonal, the mean of the
            audio->visual (rows) and visual->audio (columns) cross-entropies (CLIP's form).
  cmcm      `vq.cmcm_loss` on the code distributions `vq.code_distribution(units, codebook,
            temperature=code_temperature)` of the two modalities' units against the shared
            codebook (Pbar = mean over a clip's units of softmax(-||u - e_m||); the ops' sum of
            both directions).
  commit    `vq.vector_quantize` commitment loss of each modality's units (beta =
            `commitment_cost`; summed over the two modalities). The quantised (straight-through)
            units are not consumed downstream: the summary is pooled from the continuous hidden
            states (the retrieval backbone is left as it is; not checked against the paper's code).
  total     summary + cmcm_weight * cmcm + commit.
  The codebook is updated every step by `vq.ema_codebook_update` (decay `codebook_decay`) from
  the units of BOTH modalities pooled (their counts and sums added before the moving average),
  with the assignments of the codebook before the update; filler rows (`valid` False) and padded
  frames are left out.

`cmcm_weight = 0` is the summary-only baseline: the loss is exactly the summary InfoNCE. The VQ
branch still runs as an observer on `stop_gradient(units)` (no commitment loss, nothing reaches
the encoders), so the EMA codebook still tracks both modalities' units and the baseline gets the
same codebook-usage numbers and co-occurrence pictures as CMCM.

Inputs: the paired rows and fields of `jaxspeech.methods.uavm` (`audio_feats` `[Ta, Ca]` MFCC
frames or feature files, `visual_feats` `[Tv, Cv]`: an 8 x 8 digit scan's 8 rows as 8 frames, or
feature files; masks; `label`, used by the evaluation only). The default manifest is the
FSDD x load_digits pairs of `data_pipelines.av_pairs` (unseen test speakers and images).

Predictions (`predict_fns`, used by `jaxspeech/eval/retrieval.py`):
  'pair_embeddings'  (batch, modality: 'audio' | 'visual', static) -> {'summary' [B, E],
                     'code_dist' [B, V] (Pbar), 'codes' [B, T] int32 (nearest codeword of each
                     unit), 'mask' [B, T] bool}
  'pair_similarity'  (audio: dict, visual: dict, part: 'combined' | 'summary' | 'codes',
                     static) -> [Na, Nv] float32, from two 'pair_embeddings' outputs (any
                     number of rows each): 'summary' = cosine of the summaries, 'codes' =
                     `vq.cmcm_similarity` of the code distributions, 'combined' = summary +
                     alpha * codes (alpha = `config.method.alpha`; 0 when cmcm_weight = 0).
                     Symmetric in the roles: visual->audio retrieval uses the transpose.

Legend: B batch, Ta / Tv audio / visual frames (units: Ta / audio_stack), Ca / Cv their
features, D width, Q code_dim, E embed_dim, V codebook size, Na / Nv rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspeech.errors import ConfigError
from jaxspeech.methods.base import Method
from jaxspeech.methods.uavm import (
  pair_default_manifest,
  pair_host_fields,
  pair_inputs,
  pair_row_fields,
)
from jaxspeech.models.cmcm_nets import CMCMConfig, CrossModalEncoder
from jaxspeech.ops import codebook as cb_ops
from jaxspeech.ops import vq

PARTS = ('combined', 'summary', 'codes')
_NEG = -1e9  # logit of a filler-row pair: finite, so a fully masked row has finite gradients


def summary_info_nce(za: jax.Array, zb: jax.Array, valid: jax.Array,
                     temperature: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Symmetric InfoNCE of paired embeddings `za [B, E]`, `zb [B, E]` (pair i = (za_i, zb_i)):
  the mean over valid rows of the A->B and B->A cross-entropies of the logits
  `za @ zb.T / temperature`, averaged over the two directions. Filler rows (`valid [B]` False)
  are neither anchors nor negatives. Returns (loss [], A->B top-1 accuracy [], B->A accuracy [])
  in the batch."""
  logits = jnp.einsum('id,jd->ij', za, zb, precision=jax.lax.Precision.HIGHEST) / temperature
  pair_ok = valid[:, None] & valid[None, :]  # [B, B]
  logits = jnp.where(pair_ok, logits, _NEG)
  diag = jnp.diagonal(logits)  # [B]
  row = diag - jax.nn.logsumexp(logits, axis=1)  # log p(b_i | a_i)
  col = diag - jax.nn.logsumexp(logits, axis=0)  # log p(a_i | b_i)
  w = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  loss = -jnp.sum(w * (row + col)) / (2.0 * n)
  idx = jnp.arange(za.shape[0])
  acc_ab = jnp.sum(w * (jnp.argmax(logits, 1) == idx)) / n
  acc_ba = jnp.sum(w * (jnp.argmax(logits, 0) == idx)) / n
  return loss, acc_ab, acc_ba


def codebook_state(extra_codebook) -> vq.EMACodebookState:
  """`extra_state['codebook']` (a dict, as checkpoints restore it) as an EMACodebookState."""
  if isinstance(extra_codebook, vq.EMACodebookState):
    return extra_codebook
  return vq.EMACodebookState(**{k: extra_codebook[k] for k in vq.EMACodebookState._fields})


class Cmcm(Method):
  name = 'cmcm'
  encoder_path = None
  uses_audio = False  # the rows carry file paths; host_fields reads them (no waveform batches)

  def __init__(self, config):
    super().__init__(config)
    m = config.method
    self.audio_input, self.visual_input = pair_inputs(m)
    self.num_classes = int(m.num_classes)
    self.codebook_size = int(m.codebook_size)
    if self.codebook_size < 2:
      raise ConfigError(f'config.method.codebook_size={self.codebook_size}: need >= 2')
    self.cmcm_weight = float(m.cmcm_weight)
    if self.cmcm_weight < 0:
      raise ConfigError(f'config.method.cmcm_weight={self.cmcm_weight}: must be >= 0 '
                        '(0 = the summary-only baseline)')
    self.cmcm_on = self.cmcm_weight > 0
    # The combined retrieval similarity uses the codes only when they were trained to match.
    self.alpha = float(m.alpha) if self.cmcm_on else 0.0
    self.temperature = float(m.temperature)
    self.code_temperature = float(m.code_temperature)
    for key, t in (('temperature', self.temperature), ('code_temperature',
                                                       self.code_temperature)):
      if t <= 0:
        raise ConfigError(f'config.method.{key}={t}: must be > 0')
    self.commitment_cost = float(m.commitment_cost)
    self.codebook_decay = float(m.codebook_decay)
    if not 0.0 <= self.codebook_decay < 1.0:
      raise ConfigError(f'config.method.codebook_decay={self.codebook_decay}: must be in [0, 1)')
    try:
      self.model_config = CMCMConfig(
        audio_dim=int(m.audio_dim), visual_dim=int(m.visual_dim),
        audio_frames=int(m.audio_frames), visual_frames=int(m.visual_frames), dim=int(m.dim),
        num_heads=int(m.num_heads), depth=int(m.depth), mlp_ratio=int(m.mlp_ratio),
        code_dim=int(m.code_dim), embed_dim=int(m.embed_dim), audio_stack=int(m.audio_stack),
        dropout=float(m.dropout))
    except ValueError as e:
      raise ConfigError(f'config.method: {e}') from None

  # --- model -------------------------------------------------------------------------------------

  def init(self, rng):
    p_rng, c_rng = jax.random.split(rng)
    model = CrossModalEncoder(self.model_config, rngs=nnx.Rngs(params=p_rng))
    codebook = jax.random.normal(c_rng, (self.codebook_size, self.model_config.code_dim),
                                 jnp.float32)  # [V, Q], the scale of the standardised units
    return model, {'codebook': vq.ema_codebook_init(codebook)._asdict()}

  # --- data --------------------------------------------------------------------------------------

  def row_fields(self):
    return pair_row_fields(self.model_config)

  def host_fields(self, row):
    """The paired fields of `uavm.pair_host_fields`; a row without "label" (e.g. Places
    captions: retrieval of the exact pair only) gets label -1."""
    c, m = self.model_config, self.config.method
    has_label = 'label' in row
    out = pair_host_fields(row if has_label else {**row, 'label': 0}, self.audio_input,
                           self.visual_input, c.audio_frames, c.audio_dim, c.visual_frames,
                           c.visual_dim, self.num_classes, str(m.audio_features_key),
                           str(m.visual_features_key))
    if not has_label:
      out['label'] = np.int32(-1)
    return out

  def default_manifest(self, data_config):
    return pair_default_manifest(self.config.method, data_config, self.audio_input,
                                 self.visual_input)

  # --- loss --------------------------------------------------------------------------------------

  def loss_fn(self, model: CrossModalEncoder, extra_state, batch, rng):
    r_a, r_v = jax.random.split(rng)
    valid = batch['valid']  # [B]
    ea = model.encode(batch['audio_feats'], batch['audio_feats_mask'], 'audio',
                      deterministic=False, rng=r_a)
    ev = model.encode(batch['visual_feats'], batch['visual_feats_mask'], 'visual',
                      deterministic=False, rng=r_v)
    summary, acc_av, acc_va = summary_info_nce(ea.summary, ev.summary, valid, self.temperature)

    state = codebook_state(extra_state['codebook'])
    codebook = state.codebook  # [V, Q], no gradient (EMA state)
    ua, uv = ea.units, ev.units  # [B, Ta, Q], [B, Tv, Q]
    if not self.cmcm_on:  # the baseline: the VQ branch only observes
      ua, uv = jax.lax.stop_gradient(ua), jax.lax.stop_gradient(uv)
    ma = ea.mask & valid[:, None]  # [B, Ta]
    mv = ev.mask & valid[:, None]  # [B, Tv]
    qa = vq.vector_quantize(ua, codebook, ma, self.commitment_cost)
    qv = vq.vector_quantize(uv, codebook, mv, self.commitment_cost)
    pa = vq.code_distribution(ua, codebook, ma, self.code_temperature)  # [B, V]
    pv = vq.code_distribution(uv, codebook, mv, self.code_temperature)  # [B, V]
    cmcm = vq.cmcm_loss(pa, pv, valid)
    commit = qa.commitment_loss + qv.commitment_loss
    loss = summary
    if self.cmcm_on:
      loss = loss + self.cmcm_weight * cmcm + commit
    new_state = vq.ema_codebook_update(
      state, [jax.lax.stop_gradient(ua), jax.lax.stop_gradient(uv)], [qa.codes, qv.codes],
      [ma, mv], self.codebook_decay)

    v = self.codebook_size
    use_a = cb_ops.codebook_usage(qa.codes, ma, v)
    use_v = cb_ops.codebook_usage(qv.codes, mv, v)
    hist = [jnp.sum(jax.nn.one_hot(q.codes, v) * m[..., None], axis=(0, 1)) for q, m in
            ((qa, ma), (qv, mv))]  # 2 x [V]
    metrics = {
      'summary_loss': summary, 'cmcm_loss': cmcm, 'commitment': commit,
      'a2v_batch_acc': acc_av, 'v2a_batch_acc': acc_va,
      'codebook_ppl_audio': use_a['perplexity'], 'codebook_ppl_visual': use_v['perplexity'],
      'codebook_used_audio': use_a['used_fraction'],
      'codebook_used_visual': use_v['used_fraction'],
      'codebook_used_both': jnp.mean(((hist[0] > 0) & (hist[1] > 0)).astype(jnp.float32)),
    }
    return loss, (metrics, {**extra_state, 'codebook': new_state._asdict()})

  # --- prediction --------------------------------------------------------------------------------

  def predict_fns(self, model: CrossModalEncoder, extra_state):
    codebook = codebook_state(extra_state['codebook']).codebook  # [V, Q]
    code_temperature, alpha = self.code_temperature, self.alpha

    def pair_embeddings(batch, modality):
      key = {'audio': 'audio_feats', 'visual': 'visual_feats'}[modality]
      e = model.encode(batch[key], batch[f'{key}_mask'], modality)
      codes, _ = cb_ops.nearest_codeword(e.units, codebook)  # [B, T]
      return {'summary': e.summary,
              'code_dist': vq.code_distribution(e.units, codebook, e.mask, code_temperature),
              'codes': codes.astype(jnp.int32), 'mask': e.mask}

    def pair_similarity(audio, visual, part='combined'):
      if part not in PARTS:
        raise ValueError(f'pair_similarity: part {part!r}, one of {PARTS}')
      cos = jnp.einsum('ie,je->ij', audio['summary'], visual['summary'],
                       precision=jax.lax.Precision.HIGHEST)  # [Na, Nv]
      if part == 'summary':
        return cos
      codes = vq.cmcm_similarity(audio['code_dist'], visual['code_dist'])  # [Na, Nv]
      return codes if part == 'codes' else cos + alpha * codes

    return {'pair_embeddings': pair_embeddings, 'pair_similarity': pair_similarity}
