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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def matmul_peak(n: int = 2048, repeats: int = 5, device: str = "cpu") -> dict:
  """Achieved FLOP/s of an n^3 matmul, jax and torch, float32 on CPU, bfloat16 on GPU."""
  import jax
  import jax.numpy as jnp
  import torch

  gpu = device == "gpu"
  dtype = jnp.bfloat16 if gpu else jnp.float32
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  tj, _ = median_time(lambda: f(a, a).block_until_ready(), repeats)
  ta = torch.randn(n, n, device="cuda" if gpu else "cpu",
                   dtype=torch.bfloat16 if gpu else torch.float32)

  def torch_mm():
    ta @ ta
    if gpu:
      torch.cuda.synchronize()

  tt, _ = median_time(torch_mm, repeats)
  flops = 2.0 * n**3
  return {"jax": flops / tj, "torch": flops / tt, "peak": max(flops / tj, flops / tt), "n": n,
          "dtype": "bfloat16" if gpu else "float32"}  # fmt: skip


def jax_memory(compiled) -> dict:
  """`compiled.memory_analysis()` bytes (per device) and `peak_bytes` = arguments + outputs +
  temporaries - aliased: everything the step holds at once at most. (XLA:CPU's own
  `peak_memory_in_bytes` is kept as reported but can be below the temporaries alone.)"""
  mem = compiled.memory_analysis()
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes", "peak_memory_in_bytes")  # fmt: skip
  d = {k: int(getattr(mem, k)) for k in keys if mem is not None and hasattr(mem, k)}
  if d:
    d["peak_bytes"] = (d["argument_size_in_bytes"] + d["output_size_in_bytes"]
                       + d["temp_size_in_bytes"] - d.get("alias_size_in_bytes", 0))  # fmt: skip
  return d


def bench_jax(cfg, wav: np.ndarray, repeats: int, with_memory: bool = False):
  """Median wall time of the jitted encoder forward+backward. Returns (median, times,
  compile_s), plus `jax_memory` of the compiled step when `with_memory`."""
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
      return jnp.mean(jnp.square(out.last_hidden_state.astype(jnp.float32)))

    return jax.value_and_grad(loss_fn)(params)

  x = jnp.asarray(wav)
  t0 = time.perf_counter()
  compiled = step.lower(params, x).compile()
  jax.block_until_ready(compiled(params, x))
  compile_s = time.perf_counter() - t0
  med, times = median_time(lambda: jax.block_until_ready(compiled(params, x)), repeats)
  if with_memory:
    return med, times, compile_s, jax_memory(compiled)
  return med, times, compile_s


def hf_model(cfg):
  """The HF transformers model of `cfg` (same architecture), dropout and masking off."""
  import transformers

  from jaxspeech.interop.hf import config_to_hf

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
  return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**d))


def bench_torch(cfg, wav: np.ndarray, repeats: int, threads: int, device: str = "cpu",
                return_step: bool = False):
  """Median wall time of the HF model's forward+backward (bfloat16 autocast on GPU); with
  `return_step` also the step function (for a memory measurement after the timing)."""
  import torch

  torch.set_num_threads(threads)
  gpu = device == "gpu"
  model = hf_model(cfg).to("cuda" if gpu else "cpu")
  model.train()  # training mode as in a real step; all dropout rates are zero
  x = torch.from_numpy(wav).to("cuda" if gpu else "cpu")

  def step():
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
      loss = model(x).last_hidden_state.float().square().mean()
    loss.backward()
    if gpu:
      torch.cuda.synchronize()

  med, times = median_time(step, repeats)
  return (med, times, step) if return_step else (med, times)


_TORCH_CHILD = r"""
import json, sys
import numpy as np
import torch, transformers  # imported before the baseline: library memory is not the step's
from benchmarks import encoder_step
from jaxspeech.models.speech_encoder import EncoderConfig
a = json.loads(sys.argv[1])
cfg = EncoderConfig.from_dict(a['cfg'])
gpu = a['device'] == 'gpu'
wav = encoder_step.wav_input(a['batch'], a['samples'])
anon0 = encoder_step.rss_bytes('RssAnon')
if gpu:
  torch.cuda.reset_peak_memory_stats()
med, times, step = encoder_step.bench_torch(cfg, wav, a['repeats'], a['threads'], a['device'],
                                            return_step=True)
res = {'torch_step_s': med, 'torch_step_all_s': times, 'torch_version': torch.__version__,
       'transformers_version': transformers.__version__, 'torch_threads': torch.get_num_threads()}
if gpu:
  res.update(torch_peak_bytes=int(torch.cuda.max_memory_allocated()),
             torch_peak_source='torch.cuda.max_memory_allocated')
else:
  res.update(torch_peak_bytes=encoder_step.step_peak_anon_rss(step) - anon0,
             torch_peak_source='peak anonymous RSS of one step after the timed ones (VmHWM '
                               'reset, less file-backed pages) - anonymous RSS before the model')
print('RESULT ' + json.dumps(res))
"""


def rss_bytes(field: str) -> int:
  """A memory field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile, RssShmem), bytes."""
  with open("/proc/self/status") as f:
    for ln in f:
      if ln.startswith(field + ":"):
        return int(ln.split()[1]) * 1024
  raise KeyError(field)


def step_peak_anon_rss(step) -> int:
  """Peak anonymous resident memory (bytes) while `step()` runs once, on Linux: the peak RSS is
  reset (`5` > /proc/self/clear_refs), the step run, and the file-backed and shared pages (library
  code, already paged in by the earlier runs) taken off the new peak. Not tracemalloc: torch's
  allocations bypass Python's allocator."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  step()
  return rss_bytes("VmHWM") - rss_bytes("RssFile") - rss_bytes("RssShmem")


def bench_torch_subprocess(cfg, batch: int, samples: int, repeats: int, threads: int,
                           device: str = "cpu", timeout: int = 1800) -> dict:
  """`bench_torch` in a fresh interpreter, with its peak memory: on CPU the peak anonymous RSS of
  one more step after the timed ones less the anonymous RSS before the model was built
  (parameters, gradients, activations, allocator slack; `step_peak_anon_rss`), on GPU
  `torch.cuda.max_memory_allocated`. Same inputs (seeded) and thread count as the jax run."""
  import subprocess
  import sys

  arg = json.dumps({"cfg": cfg.to_dict(), "batch": batch, "samples": samples, "repeats": repeats,
                    "threads": threads, "device": device})  # fmt: skip
  # The child needs jax only for EncoderConfig: keep it off the GPU (no memory preallocated).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _TORCH_CHILD, arg], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)  # fmt: skip
  if proc.returncode:
    raise RuntimeError(f"torch benchmark of {cfg.model_type} failed:\n{proc.stderr[-3000:]}")
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def wav_input(batch: int, samples: int) -> np.ndarray:
  """The benchmark's (seeded) input audio `[B, S]`, the same in every process."""
  return np.random.default_rng(0).normal(size=(batch, samples)).astype(np.float32) * 0.1


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
  wav = wav_input(args.batch, s)
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
