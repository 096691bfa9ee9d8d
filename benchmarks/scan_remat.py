"""Scale knobs of the speech encoder (issue 14): the layer loop vs `scan_layers` vs scan + remat
vs scan + remat + bfloat16 compute, on one encoder train step.

    python -m benchmarks.scan_remat [--model hubert-base] [--batch 2] [--seconds 4] \
        [--repeats 3] [--remat full] [--out scan_remat.json]

Step = `jax.value_and_grad` of the mean square of a fixed random projection (D -> 16) of
`last_hidden_state` (float32) w.r.t. every parameter, dropout off (the mean square of a post-LN
output itself is ~1 whatever the numerics, so it could not show a bfloat16 error), on the seeded
random audio of `encoder_step.wav_input`. Per case: compile time (`jit(...).lower(...)
.compile()`), memory (`compiled.memory_analysis()`: arguments + outputs + temporaries, less
aliased), step time (median of `--repeats` after 2 warm-up calls), and the loss and
last_hidden_state against the float32 loop's. All cases start from the same parameters (a seed
gives the same model in either layer layout; bfloat16 compute keeps float32 parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from benchmarks.encoder_step import jax_memory, median_time, wav_input

CASES = (
  ("loop/f32", dict()),
  ("scan/f32", dict(scan_layers=True)),
  ("scan+remat/f32", dict(scan_layers=True, remat="{remat}")),
  ("scan+remat/bf16", dict(scan_layers=True, remat="{remat}", dtype="bfloat16")),
)


def bench_case(cfg, wav, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxspeech.models.speech_encoder import SpeechEncoder

  graphdef, params = nnx.split(SpeechEncoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  proj = jax.random.normal(jax.random.key(1), (cfg.hidden_size, 16)) / cfg.hidden_size**0.5

  @jax.jit
  def step(params, wav):
    def loss_fn(p):
      h = nnx.merge(graphdef, p)(wav).last_hidden_state.astype(jnp.float32)  # [B, T, D]
      return jnp.mean(jnp.square(h @ proj)), h

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  x = jnp.asarray(wav)
  t0 = time.perf_counter()
  compiled = step.lower(params, x).compile()
  compile_s = time.perf_counter() - t0
  (loss, last), _ = compiled(params, x)
  med, times = median_time(lambda: jax.block_until_ready(compiled(params, x)), repeats)
  return {"compile_s": compile_s, "step_s": med, "step_all_s": times, "loss": float(loss),
          "memory": jax_memory(compiled)}, np.asarray(last)  # fmt: skip


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="hubert-base")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seconds", type=float, default=4.0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--remat", default="full", help="EncoderConfig.remat of the remat cases")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  import jax

  from jaxspeech.models.speech_encoder import EncoderConfig

  base = EncoderConfig.preset(args.model)
  wav = wav_input(args.batch, int(args.seconds * 16000))
  res = {"model": args.model, "batch": args.batch, "seconds": args.seconds,
         "repeats": args.repeats, "device": jax.devices()[0].device_kind,
         "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
         "load_average_1m_at_start": os.getloadavg()[0], "cases": {}}  # fmt: skip
  for name, overrides in CASES:
    kw = {k: v.format(remat=args.remat) if isinstance(v, str) else v for k, v in overrides.items()}
    cfg = dataclasses.replace(base, **kw)
    r, last = bench_case(cfg, wav, args.repeats)
    r["config"] = kw
    if name == "loop/f32":
      ref_last = last
    r["last_hidden_max_abs_diff_vs_loop_f32"] = float(np.max(np.abs(last - ref_last)))
    res["cases"][name] = r
    print(f"{name}: compile {r['compile_s']:.1f} s, step {r['step_s']:.3f} s, "
          f"memory {r['memory'].get('peak_bytes', 0) / 2**20:.0f} MiB", flush=True)
  ref = res["cases"]["loop/f32"]
  for r in res["cases"].values():
    r["loss_rel_diff_vs_loop_f32"] = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])

  mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
  print(f"\n| {args.model} value_and_grad, {args.batch} x {args.seconds:g} s, remat="
        f"{args.remat} | compile | step (median of {args.repeats}) | memory (args+out+temp) "
        "| temp | loss rel. diff vs loop/f32 | max abs diff last_hidden_state |")
  print("|---|---|---|---|---|---|---|")
  for name, r in res["cases"].items():
    m = r["memory"]
    print(f"| {name} | {r['compile_s']:.1f} s | {r['step_s']:.3f} s | {mib(m['peak_bytes'])} | "
          f"{mib(m['temp_size_in_bytes'])} | {r['loss_rel_diff_vs_loop_f32']:.1e} | "
          f"{r['last_hidden_max_abs_diff_vs_loop_f32']:.1e} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == "__main__":
  main()
