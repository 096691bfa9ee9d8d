"""Encoder train-step benchmark: jaxspeech (jax.jit) vs HF transformers (PyTorch), same machine,
same run, same inputs, same thread count.

    python -m benchmarks.encoder_step [--model hubert-base] [--batch 2] [--seconds 4] [--repeats 5]

Forward+backward of the encoder (loss = mean square of the last hidden state, gradients for all
parameters, dropout off) on B x S seconds of audio. Prints medians over repeats after warm-up, the
ratio jaxspeech / PyTorch, and the achieved FLOP/s over a float32 matmul peak measured in the same
run (2048^3, best of jax and torch). Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

HF_CLASSES = {
  "hubert": ("HubertModel", "HubertConfig"),
  "wavlm": ("WavLMModel", "WavLMConfig"),
  "wav2vec2": ("Wav2Vec2Model", "Wav2Vec2Config"),
}


def encoder_flops(cfg, num_samples: int, batch: int) -> float:
  """Analytic forward FLOPs (2 per multiply-add) of the encoder on B x S samples."""
  flops, t = 0.0, num_samples
  c_in = 1
  for c, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
    t = (t - k) // s + 1
    flops += 2 * t * k * c_in * c
    c_in = c
  d, f = cfg.hidden_size, cfg.intermediate_size
  flops += 2 * t * c_in * d  # projection
  flops += 2 * t * cfg.num_conv_pos_embeddings * (d // cfg.num_conv_pos_embedding_groups) * d
  per_layer = 4 * 2 * t * d * d + 2 * 2 * t * t * d + 2 * 2 * t * d * f
  flops += cfg.num_hidden_layers * per_layer
  return batch * flops


def median_time(fn, repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
  import jax
  import jax.numpy as jnp
  import torch

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  tj, _ = median_time(lambda: f(a, a).block_until_ready(), repeats)
  ta = torch.randn(n, n)
  tt, _ = median_time(lambda: ta @ ta, repeats)
  flops = 2.0 * n**3
  return {"jax": flops / tj, "torch": flops / tt, "peak": max(flops / tj, flops / tt)}


def bench_jax(cfg, wav: np.ndarray, repeats: int):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxspeech.models.speech_encoder import SpeechEncoder

  model = SpeechEncoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def step(params, wav):
    def loss_fn(p):
      out = nnx.merge(graphdef, p)(wav)
      return jnp.mean(jnp.square(out.last_hidden_state))

    return jax.value_and_grad(loss_fn)(params)

  x = jnp.asarray(wav)
  t0 = time.perf_counter()
  jax.block_until_ready(step(params, x))
  compile_s = time.perf_counter() - t0
  med, times = median_time(lambda: jax.block_until_ready(step(params, x)), repeats)
  return med, times, compile_s


def bench_torch(cfg, wav: np.ndarray, repeats: int, threads: int):
  import torch
  import transformers

  from jaxspeech.interop.hf import config_to_hf

  torch.set_num_threads(threads)
  model_cls, cfg_cls = HF_CLASSES[cfg.model_type]
  d = config_to_hf(cfg)
  d.update(
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
    mask_time_prob=0.0,
  )
  d.pop("architectures")
  model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**d))
  model.train()  # training mode as in a real step; all dropout rates are zero
  x = torch.from_numpy(wav)

  def step():
    model.zero_grad(set_to_none=True)
    loss = model(x).last_hidden_state.square().mean()
    loss.backward()

  med, times = median_time(step, repeats)
  return med, times


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="hubert-base")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seconds", type=float, default=4.0)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  import jax

  from jaxspeech.models.speech_encoder import EncoderConfig

  cfg = EncoderConfig.preset(args.model)
  s = int(args.seconds * 16000)
  wav = np.random.default_rng(0).normal(size=(args.batch, s)).astype(np.float32) * 0.1
  threads = os.cpu_count() or 1
  peak = matmul_peak()
  fwd_flops = encoder_flops(cfg, s, args.batch)
  step_flops = 3 * fwd_flops  # backward ~ 2x forward
  tj, tj_all, compile_s = bench_jax(cfg, wav, args.repeats)
  res = {
    "model": args.model,
    "batch": args.batch,
    "seconds": args.seconds,
    "device": jax.devices()[0].device_kind,
    "platform": platform.processor() or platform.machine(),
    "cpu_count": threads,
    "jax_version": jax.__version__,
    "matmul_peak_flops": peak["peak"],
    "matmul_flops_jax": peak["jax"],
    "matmul_flops_torch": peak["torch"],
    "step_flops": step_flops,
    "jax_step_s": tj,
    "jax_step_all_s": tj_all,
    "jax_compile_s": compile_s,
    "jax_flops_per_s": step_flops / tj,
    "encoder_mfu_cpu": step_flops / tj / peak["peak"],
  }
  if not args.skip_torch:
    import torch

    tt, tt_all = bench_torch(cfg, wav, args.repeats, threads)
    res.update(
      {
        "torch_version": torch.__version__,
        "torch_step_s": tt,
        "torch_step_all_s": tt_all,
        "torch_flops_per_s": step_flops / tt,
        "torch_mfu_cpu": step_flops / tt / peak["peak"],
        "encoder_ratio_vs_torch": tj / tt,
      }
    )
  print(
    f"| {args.model} fwd+bwd, {args.batch} x {args.seconds:g} s | time (median of "
    f"{args.repeats}) | GFLOP/s | share of matmul peak |"
  )
  print("|---|---|---|---|")
  print(
    f"| jaxspeech (jit) | {tj:.3f} s | {step_flops / tj / 1e9:.1f} | {res['encoder_mfu_cpu']:.0%} |"
  )
  if "torch_step_s" in res:
    print(
      f"| transformers (torch {res['torch_version']}) | {res['torch_step_s']:.3f} s | "
      f"{res['torch_flops_per_s'] / 1e9:.1f} | {res['torch_mfu_cpu']:.0%} |"
    )
    print(f"\nratio jaxspeech / PyTorch = {res['encoder_ratio_vs_torch']:.2f}")
  print(
    f"matmul peak (2048^3 f32): {peak['peak'] / 1e9:.1f} GFLOP/s "
    f"(jax {peak['jax'] / 1e9:.1f}, torch {peak['torch'] / 1e9:.1f}); "
    f"step = {step_flops / 1e9:.1f} GFLOP; jax compile {compile_s:.1f} s"
  )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == "__main__":
  main()
