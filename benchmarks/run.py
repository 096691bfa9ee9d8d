r"""The benchmark suite: one entry point, a Markdown report and one JSON file.

  python -m benchmarks.run --quick --out results.json          # < ~3 min on a 2-core CPU
  python -m benchmarks.run --out results.json                  # the README's numbers (base sizes)
  python -m benchmarks.run --device gpu --out results.json     # bfloat16 on the first GPU
  python -m benchmarks.run --quick --sections encoder,data --out r.json

Sections (`--sections`, default all; see benchmarks/README.md for the methods):
  encoder  jaxspeech (jit) vs HF transformers (PyTorch) encoder forward+backward, HuBERT-base and
           WavLM-base at 2 x 4 s and 8 x 4 s (quick: the `tiny` encoder, 1 x 1 s): medians, ratio,
           peak memory of each, and MFU against a matmul peak measured in the same run.
  method   Spin / DinoSR / HuBERT / PARP train steps and the share of the method's own ops.
  data     loader throughput (audio-seconds per second) with and without perturbation.
  scaling  step time and memory per device on 1, 2, 4, 8 fake CPU devices (quick: 1, 2).

Top-level JSON keys: `encoder_ratio_vs_torch` (HuBERT-base 2 x 4 s jaxspeech / PyTorch time;
quick: tiny 1 x 1 s), `encoder_mfu_cpu` (its FLOP/s over the measured matmul peak; `_gpu` with
--device gpu), `matmul_peak_flops`, `machine`, `quick`, and one block per section.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

SECTIONS = ('encoder', 'method', 'data', 'scaling')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_device(device: str) -> None:
  """Pins jax to the CPU, or checks that jax and torch both see a GPU (clear error if not).
  Must run before jax is imported."""
  if device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
    return
  # jax would otherwise take 75% of the GPU's memory up front, and the PyTorch subprocess needs
  # room; jax's memory is read from the compiled step, not from the allocator.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax
  import torch

  try:
    gpus = jax.devices('gpu')
  except RuntimeError:
    gpus = []
  if not gpus or not torch.cuda.is_available():
    raise SystemExit(f'--device gpu: no GPU found (jax GPU devices: {len(gpus)}, '
                     f'torch.cuda.is_available(): {torch.cuda.is_available()}); needs jax with '
                     'CUDA (jax[cuda12]) and a CUDA build of torch. Run with --device cpu.')


def machine(device: str) -> dict:
  import jax
  import jaxlib
  import torch
  import transformers

  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  d = {
    'cpu_model': cpu, 'cores': os.cpu_count(), 'device': device,
    'device_kind': str(jax.devices()[0].device_kind), 'num_jax_devices': jax.device_count(),
    'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
    'torch': torch.__version__, 'transformers': transformers.__version__,
    'torch_threads': torch.get_num_threads(),
    'date_utc': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M'),
    'load_average_1m_at_start': os.getloadavg()[0],
  }
  if device == 'gpu':
    d['gpu'] = torch.cuda.get_device_name(0)
  return d


# ---------------------------------------------------------------------------------------------
# Encoder: jaxspeech vs transformers.


def encoder_cases(quick: bool) -> list[tuple[str, int, float]]:
  """(preset, batch, seconds); the first one is the headline (HuBERT, 2 x 4 s)."""
  if quick:
    return [('tiny', 1, 1.0), ('wavlm-tiny', 1, 1.0)]
  return [(m, b, 4.0) for m in ('hubert-base', 'wavlm-base') for b in (2, 8)]


def encoder_config(name: str, device: str):
  from jaxspeech.models.speech_encoder import EncoderConfig

  cfg = (dataclasses.replace(EncoderConfig.preset('tiny'), model_type='wavlm')
         if name == 'wavlm-tiny' else EncoderConfig.preset(name))
  # GPU: bfloat16 activations (params stay float32), as torch's bfloat16 autocast.
  return dataclasses.replace(cfg, dtype='bfloat16') if device == 'gpu' else cfg


def encoder_section(quick: bool, device: str, peak: dict, threads: int,
                    models: list[str] | None = None) -> list[dict]:
  from benchmarks import encoder_step as es

  repeats = 3 if quick else 5
  rows = []
  for name, batch, seconds in encoder_cases(quick):
    if models and name not in models:
      continue
    cfg = encoder_config(name, device)
    samples = int(seconds * 16000)
    wav = es.wav_input(batch, samples)
    step_flops = 3 * es.encoder_flops(cfg, samples, batch)  # backward ~ 2x forward
    tj, tj_all, compile_s, mem = es.bench_jax(cfg, wav, repeats, with_memory=True)
    tr = es.bench_torch_subprocess(cfg, batch, samples, repeats, threads, device)
    tt = tr['torch_step_s']
    rows.append({
      'model': name, 'batch': batch, 'seconds': seconds, 'repeats': repeats,
      'step_flops': step_flops, 'jax_step_s': tj, 'jax_step_all_s': tj_all,
      'jax_compile_s': compile_s, 'jax_peak_bytes': mem.get('peak_bytes'), 'jax_memory': mem,
      **tr, 'ratio_jax_over_torch': tj / tt,
      'jax_mfu': step_flops / tj / peak['peak'], 'torch_mfu': step_flops / tt / peak['peak'],
    })
    r = rows[-1]
    print(f"# encoder {name} {batch} x {seconds:g} s: jax {tj:.3f} s, torch {tt:.3f} s, "
          f"ratio {r['ratio_jax_over_torch']:.2f}, jax MFU {r['jax_mfu']:.1%}", flush=True)
  return rows


def encoder_table(rows: list[dict], peak: dict) -> str:
  out = ['| encoder fwd+bwd (B x S) | jaxspeech (jit) | PyTorch (transformers) | jax / torch | '
         'MFU jax | MFU torch | peak mem jax | peak mem torch |', '|' + '---|' * 8]
  for r in rows:
    out.append(
      f"| {r['model']} {r['batch']} x {r['seconds']:g} s | {r['jax_step_s']:.3f} s | "
      f"{r['torch_step_s']:.3f} s | {r['ratio_jax_over_torch']:.2f} | {r['jax_mfu']:.1%} | "
      f"{r['torch_mfu']:.1%} | {r['jax_peak_bytes'] / 2**20:.0f} MiB | "
      f"{r['torch_peak_bytes'] / 2**20:.0f} MiB |")
  out.append(f"\nmatmul peak ({peak['n']}^3 {peak['dtype']}): {peak['peak'] / 1e9:.1f} GFLOP/s "
             f"(jax {peak['jax'] / 1e9:.1f}, torch {peak['torch'] / 1e9:.1f})")
  return '\n'.join(out)


# ---------------------------------------------------------------------------------------------
# Data: loader throughput.


def data_section(quick: bool) -> dict:
  sys.path.insert(0, ROOT)
  from benchmarks.loader_throughput import SHARED, throughput
  from data_pipelines.manifest import build_manifest

  rows = build_manifest(os.path.join(SHARED, 'librispeech-excerpt'), 'librispeech')[0]
  perturbs = (None, 'jax') if quick else (None, 'jax', 'praat')
  workers = (0,) if quick else (0, 2)
  batches = 3 if quick else 20
  res = {'corpus': 'librispeech-excerpt (FLAC 16 kHz), random 4/8 s crops', 'batch_size': 8,
         'batches': batches, 'runs': {}}
  for perturb in perturbs:
    for w in workers:
      key = f'perturb={perturb}/workers={w}'
      res['runs'][key] = r = throughput(rows, buckets=(64000, 128000), batch_size=8,
                                        perturb=perturb, workers=w, batches=batches)
      print(f'# data {key}: {r}', flush=True)
  return res


def data_table(res: dict) -> str:
  out = [f"| loader ({res['corpus']}, batch {res['batch_size']}) | audio s / s | first batch |",
         '|---|---|---|']
  for k, r in res['runs'].items():
    out.append(f"| {k} | {r['audio_s_per_s']} | {r['first_batch_s']} s |")
  return '\n'.join(out)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true', help='tiny sizes, few repeats (< ~3 min CPU)')
  p.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
  p.add_argument('--sections', default='',
                 help=f'comma-separated subset of {",".join(SECTIONS)} (default: all on cpu, '
                 'encoder on gpu)')
  p.add_argument('--models', default='',
                 help='encoder section: only these presets (e.g. tiny; default: all cases)')
  p.add_argument('--out', default='results.json')
  args = p.parse_args(argv)
  sections = [s for s in args.sections.split(',') if s] or (
    list(SECTIONS) if args.device == 'cpu' else ['encoder'])
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    p.error(f'unknown sections {unknown}; choose from {SECTIONS}')
  if args.device == 'gpu' and set(sections) - {'encoder'}:
    p.error('--device gpu runs the encoder section only (the other sections are CPU '
            'measurements here): use --sections encoder')
  check_device(args.device)
  t_start = time.perf_counter()

  from benchmarks import encoder_step as es

  threads = os.cpu_count() or 1
  res: dict = {'quick': args.quick, 'device': args.device, 'sections': sections,
               'machine': machine(args.device)}
  peak = es.matmul_peak(device=args.device)
  res['matmul_peak_flops'] = peak['peak']
  res['matmul_peak'] = peak
  report = [f"# jaxspeech benchmarks ({'quick, tiny sizes' if args.quick else 'full'}, "
            f"{args.device})", '', '```', json.dumps(res['machine'], indent=1), '```']

  if 'encoder' in sections:
    rows = encoder_section(args.quick, args.device, peak, threads,
                           [m for m in args.models.split(',') if m])
    if not rows:
      p.error(f'--models {args.models!r} matches no encoder case of this run')
    res['encoder'] = rows
    res['encoder_ratio_vs_torch'] = rows[0]['ratio_jax_over_torch']
    res[f'encoder_mfu_{args.device}'] = rows[0]['jax_mfu']
    report += ['', '## Encoder train step', '', encoder_table(rows, peak)]
  if 'method' in sections:
    from benchmarks import method_steps

    res['method'] = method_steps.run(args.quick)
    report += ['', '## Method steps', '', method_steps.table(res['method'])]
  if 'data' in sections:
    res['data'] = data_section(args.quick)
    report += ['', '## Data loader', '', data_table(res['data'])]
  if 'scaling' in sections:
    from benchmarks import scaling

    res['scaling'] = scaling.run(args.quick)
    report += ['', '## Scaling (fake CPU devices sharing the cores)', '',
               scaling.table(res['scaling'])]
  res['wall_s'] = round(time.perf_counter() - t_start, 1)
  report += ['', f"wall time {res['wall_s']} s"]
  print('\n'.join(report), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == '__main__':
  main()
