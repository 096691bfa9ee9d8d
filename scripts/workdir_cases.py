r"""Issue 22's fourteen ways to lose or misdescribe work, each run for real as a user would.

    python scripts/workdir_cases.py --out docs/workdir_cases.md     # ~10 min on 2 CPU cores

Every case runs the real command line (`python -m jaxspeech.main`, `.evaluate`, `.extract`,
`.prune`, `data_pipelines.manifest`) in a scratch folder, with the fault injected for real
(SIGKILL, a second process, truncated / resampled / deleted / corrupted files), and records the
exit code, the one line the command printed (its `error:` line, or the line that says what it
did), and which files of the workdir changed (a sha256 of every file before and after). The
result is a Markdown table (written to --out) and the same as JSON beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# A small HuBERT tiny: 4 steps of batch 4, a 2-layer encoder, a quick k-means.
FAST = ['--config.train.num_steps=4', '--config.train.log_every=1',
        '--config.train.checkpoint_every=2', '--config.data.batch_size=4',
        '--config.method.kmeans_batches=2', '--config.method.kmeans_iters=5',
        '--config.model.num_hidden_layers=2']


def env():
  e = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  e.pop('XLA_FLAGS', None)
  return e


def run(args, timeout=900):
  p = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env(), timeout=timeout)
  return p.returncode, _the_line(p.stdout, p.stderr)


def _the_line(out: str, err: str) -> str:
  """The `error:` line if there is one, else the last line that is not routine logging."""
  lines = [ln.strip() for ln in (err + '\n' + out).splitlines() if ln.strip()]
  errs = [ln for ln in lines if ': error: ' in ln]
  if errs:
    return errs[-1]
  for key in ('nothing to do', 'falling back', 'Resuming from', 'wrote ', ' ETA '):
    hits = [ln for ln in lines if key in ln]
    if hits:
      return hits[-1].split('] ', 1)[-1]
  keep = [ln for ln in lines if not ln.startswith(('I1', 'W1', 'INFO:'))]
  return keep[-1].split('] ', 1)[-1] if keep else ''


def main_cmd(workdir, *flags):
  return [PY, '-m', 'jaxspeech.main', '--config', 'experiments/hubert.py:tiny',
          '--workdir', str(workdir), *FAST, *flags]


def digest(folder) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      p = os.path.join(root, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def changed(before, after) -> str:
  keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
  if not keys:
    return 'none'
  tops = sorted({k.split('/')[0] if k.startswith('checkpoints/') is False else
                 '/'.join(k.split('/')[:2]) for k in keys})
  return ', '.join(tops)


def make_audio(folder, n=6, sr=16000, seconds=1.5, seed=0):
  """`n` WAVs of band-limited noise with a pitch track, two 'speakers'."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(sr * seconds)) / sr
  for i in range(n):
    spk = os.path.join(folder, f'spk{i % 2}')
    os.makedirs(spk, exist_ok=True)
    x = 0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(os.path.join(spk, f'utt{i}.wav'), x.astype(np.float32), sr, subtype='PCM_16')


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default='docs/workdir_cases.md')
  ap.add_argument('--keep', action='store_true', help='keep the scratch folder')
  a = ap.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix='workdir_cases_')
  rows = []

  def case(num, what, cmd_text, rc, line, files):
    rows.append({'case': num, 'what': what, 'command': cmd_text, 'exit': rc, 'line': line,
                 'files changed': files})
    print(f'[{num}] {what}: exit {rc}: {line} | changed: {files}', flush=True)

  # 1. Re-running a finished run.
  w1 = os.path.join(tmp, 'w1')
  rc, line = run(main_cmd(w1))
  assert rc == 0, line
  b = digest(w1)
  rc, line = run(main_cmd(w1))
  case(1, 're-run of a finished run', 'main (same config, again)', rc, line,
       changed(b, digest(w1)))

  # 2. A changed config on a workdir with checkpoints; and a changed learning rate.
  b = digest(w1)
  rc, line = run(main_cmd(w1, '--config.model.num_hidden_layers=3'))
  case(2, 're-run with another model', 'main --config.model.num_hidden_layers=3 (was 2)', rc, line,
       changed(b, digest(w1)))
  rc, line = run(main_cmd(w1, '--config.optim.learning_rate=0.01'))
  case(2, 're-run with another learning rate', 'main --config.optim.learning_rate=0.01', rc,
       line, changed(b, digest(w1)))
  rc, line = run(main_cmd(w1, '--config.train.num_steps=6'))
  hist = [json.loads(x) for x in open(os.path.join(w1, 'history.jsonl'))]
  case(2, 'continue: train.num_steps 4 -> 6', 'main --config.train.num_steps=6', rc,
       f'{line} (history.jsonl: {[(h["start_step"], h["num_steps"]) for h in hist]})',
       changed(b, digest(w1)))

  # 3. Two runs on one workdir.
  w3 = os.path.join(tmp, 'w3')
  first = subprocess.Popen(main_cmd(w3, '--config.train.num_steps=400',
                                    '--config.train.checkpoint_every=100'),
                           cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.exists(os.path.join(w3, 'history.jsonl')):
    time.sleep(0.2)
  hist_before = open(os.path.join(w3, 'history.jsonl')).read()
  cfg_before = open(os.path.join(w3, 'config.json')).read()
  rc, line = run(main_cmd(w3, '--config.train.num_steps=400',
                          '--config.train.checkpoint_every=100'))
  same = (open(os.path.join(w3, 'history.jsonl')).read() == hist_before
          and open(os.path.join(w3, 'config.json')).read() == cfg_before)
  case(3, 'second run while the first trains', 'main (same workdir, concurrently)', rc, line,
       'none of config.json / history.jsonl (the first run keeps training)' if same
       else 'config.json or history.jsonl CHANGED')
  first.send_signal(signal.SIGKILL)
  first.wait()
  rc, line = run(main_cmd(w3, '--config.train.num_steps=4'))
  case(3, 'after the first run was SIGKILLed (stale lock)', 'main', rc, line, '(trains)')

  # 4. checkpoint_every=0.
  w4 = os.path.join(tmp, 'w4')
  rc, line = run(main_cmd(w4, '--config.train.checkpoint_every=0'))
  case(4, 'train.checkpoint_every=0', 'main --config.train.checkpoint_every=0', rc,
       f'checkpoints/: {sorted(os.listdir(os.path.join(w4, "checkpoints")))}', '(trains)')

  # 5. prune_runner re-run with a new sparsity.
  p5 = os.path.join(tmp, 'p5')
  prune = [PY, '-m', 'jaxspeech.prune', '--config', 'experiments/parp.py:tiny', '--workdir', p5,
           '--config.prune.method=omp', '--config.train.num_steps=2',
           '--config.train.log_every=1', '--config.data.batch_size=4']
  rc, line = run(prune + ['--config.prune.sparsity=0.7'])
  b = digest(p5)
  rc, line = run(prune + ['--config.prune.sparsity=0.9'])
  case(5, 'prune re-run with another sparsity', 'prune --config.prune.sparsity=0.9 (was 0.7)',
       rc, line, changed(b, digest(p5)))

  # 6, 7, 10: data faults after the manifest was built.
  audio = os.path.join(tmp, 'audio')
  make_audio(audio)
  man = os.path.join(tmp, 'm.jsonl')
  rc, line = run([PY, '-m', 'data_pipelines.manifest', '--root', audio, '--layout', 'folder',
                  '--out', man])
  assert rc == 0, line
  data_flags = [f'--config.data.manifest={man}', '--config.data.split=',
                '--config.data.num_samples=8000']

  def data_case(num, what, fault, restore):
    w = os.path.join(tmp, f'w{num}')
    fault()
    rc, line = run(main_cmd(w, *data_flags))
    case(num, what, 'main --config.data.manifest=m.jsonl', rc, line,
         'no workdir left' if not os.path.exists(w) else f'workdir holds {os.listdir(w)}')
    restore()

  victim = os.path.join(audio, 'spk1', 'utt3.wav')
  backup = victim + '.bak'
  shutil.copy(victim, backup)

  def restore():
    shutil.copy(backup, victim)

  def resample():
    x, sr = sf.read(victim)
    sf.write(victim, x[::2], sr // 2, subtype='PCM_16')

  def truncate():
    with open(victim, 'r+b') as f:
      f.truncate(os.path.getsize(victim) // 2)

  data_case(6, 'file resampled after the manifest', resample, restore)
  data_case(7, 'WAV truncated after the manifest', truncate, restore)
  truncate()
  rc, line = run([PY, '-m', 'data_pipelines.manifest', '--root', audio, '--layout', 'folder',
                  '--out', os.path.join(tmp, 'm2.jsonl')])
  case(7, 'manifest of a folder holding a truncated WAV', 'data_pipelines.manifest', rc, line,
       'no m2.jsonl' if not os.path.exists(os.path.join(tmp, 'm2.jsonl')) else 'm2.jsonl written')
  restore()
  data_case(10, 'manifest row whose file is gone', lambda: os.remove(victim), restore)

  # 8. metrics.jsonl after a SIGKILL between checkpoints.
  w8 = os.path.join(tmp, 'w8')
  rc, _ = run(main_cmd(w8, '--config.train.kill_after_step=3'))
  before = [json.loads(x)['step'] for x in open(os.path.join(w8, 'metrics.jsonl'))]
  rc2, line = run(main_cmd(w8))
  after = [json.loads(x)['step'] for x in open(os.path.join(w8, 'metrics.jsonl'))]
  case(8, 'SIGKILL at step 3 (checkpoint at 2), re-run', 'main --config.train.kill_after_step=3;'
       ' main', rc2, f'killed: exit {rc}, steps logged {before}; after the re-run: {after}',
       '(trains)')

  # 9. Corrupt latest checkpoint.
  d = os.path.join(w8, 'checkpoints', '4', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(d):
    with open(os.path.join(d, name), 'r+b') as f:
      f.truncate(10)
  b = digest(w8)
  rc, line = run(main_cmd(w8, '--config.train.num_steps=6', '--config.train.allow_fallback=false'))
  case(9, 'corrupt latest checkpoint, allow_fallback=false',
       'main --config.train.allow_fallback=false', rc, line, changed(b, digest(w8)))
  rc, line = run(main_cmd(w8, '--config.train.num_steps=6'))
  case(9, 'corrupt latest checkpoint (default: fall back)', 'main', rc, line,
       changed(b, digest(w8)))

  # 11. main's user errors.
  w11 = os.path.join(tmp, 'w11')
  for what, cmd in [
      ('misspelt config key', main_cmd(w11, '--config.train.num_stepz=3')),
      ('missing manifest', main_cmd(w11, '--config.data.manifest=/nonexistent/m.jsonl')),
      ('empty manifest', main_cmd(w11, f'--config.data.manifest={tmp}/empty.jsonl')),
      ('workdir that is a file', main_cmd(man)),
  ]:
    open(os.path.join(tmp, 'empty.jsonl'), 'w').close()
    if os.path.isdir(w11):
      shutil.rmtree(w11)
    rc, line = run(cmd)
    case(11, what, ' '.join(c for c in cmd[3:] if c.startswith(('--config.train.num_stepz',
                                                               '--config.data.manifest'))) or
         'main --workdir m.jsonl', rc, line,
         'no workdir left' if not os.path.exists(w11) else f'workdir holds {os.listdir(w11)}')

  # 12. evaluate --k 0; manifest --out a folder.
  rc, line = run([PY, '-m', 'jaxspeech.evaluate', '--checkpoint', 'mfcc', '--manifest', man,
                  '--task', 'units', '--k', '0'])
  case(12, 'evaluate --k 0', 'evaluate --task units --k 0', rc, line, '-')
  outdir = os.path.join(tmp, 'outdir')
  os.makedirs(outdir)
  rc, line = run([PY, '-m', 'data_pipelines.manifest', '--root', audio, '--layout', 'folder',
                  '--out', outdir])
  case(12, 'manifest --out a folder', 'data_pipelines.manifest --out DIR', rc, line,
       f'files in {tmp}: {sorted(f for f in os.listdir(tmp) if f.endswith(".tmp"))} (.tmp)')

  # 13. extract's output name; a garbage HF config.json; a workdir without checkpoints.
  feats = os.path.join(tmp, 'feats.bin')
  rc, line = run([PY, '-m', 'jaxspeech.extract', '--checkpoint', w4, '--audio', victim,
                  '--out', feats])
  case(13, 'extract --out feats.bin', 'extract --out feats.bin', rc, line,
       f'written: {sorted(f for f in os.listdir(tmp) if f.startswith("feats"))}')
  hf = os.path.join(tmp, 'hf')
  os.makedirs(hf)
  with open(os.path.join(hf, 'config.json'), 'w') as f:
    f.write('{not json')
  rc, line = run([PY, '-m', 'jaxspeech.evaluate', '--checkpoint', hf, '--manifest', man,
                  '--task', 'units'])
  case(13, 'HF folder with a garbage config.json', 'evaluate --checkpoint HF', rc, line, '-')
  w13 = os.path.join(tmp, 'w13')
  os.makedirs(os.path.join(w13, 'checkpoints'))
  shutil.copy(os.path.join(w4, 'config.json'), w13)
  rc, line = run([PY, '-m', 'jaxspeech.evaluate', '--checkpoint', w13, '--manifest', man,
                  '--task', 'units'])
  case(13, 'workdir with no checkpoint', 'evaluate --checkpoint W', rc, line, '-')
  p = subprocess.run([PY, '-m', 'jaxspeech.evaluate', '--checkpoint', w4,
                      '--task', 'units', '--k', '5'], capture_output=True, text=True, cwd=REPO,
                     env=env())
  n_warn = (p.stdout + p.stderr).count('could not be restored')
  case(13, 'Orbax "Item data could not be restored" warnings on a workdir load',
       'evaluate --checkpoint W', p.returncode, f'{n_warn} warnings', '-')

  # 14. Folder layout ids; symlink loop.
  f14 = os.path.join(tmp, 'f14', 'spk')
  os.makedirs(f14)
  shutil.copy(backup, os.path.join(f14, 'x.wav'))
  sf.write(os.path.join(f14, 'x.flac'), sf.read(backup)[0], 16000)
  m14 = os.path.join(tmp, 'm14.jsonl')
  rc, line = run([PY, '-m', 'data_pipelines.manifest', '--root', os.path.dirname(f14),
                  '--layout', 'folder', '--out', m14])
  ids = sorted(json.loads(x)['id'] for x in open(m14)) if os.path.exists(m14) else []
  case(14, 'x.wav and x.flac in one folder', 'data_pipelines.manifest --layout folder', rc,
       f'ids {ids}', '-')
  os.symlink('loop_b.wav', os.path.join(f14, 'loop_a.wav'))
  os.symlink('loop_a.wav', os.path.join(f14, 'loop_b.wav'))
  rc, line = run([PY, '-m', 'data_pipelines.manifest', '--root', os.path.dirname(f14),
                  '--layout', 'folder', '--out', m14 + '2'])
  case(14, 'symlink loop', 'data_pipelines.manifest --layout folder', rc, line, '-')

  with open(a.out, 'w') as f:
    f.write('| # | case | command | exit | what it printed | workdir files changed |\n')
    f.write('|---|---|---|---|---|---|\n')
    for r in rows:
      line = r['line'].replace('|', '\\|').replace(tmp, '$TMP')
      f.write(f"| {r['case']} | {r['what']} | `{r['command']}` | {r['exit']} | {line} | "
              f"{r['files changed']} |\n")
  with open(os.path.splitext(a.out)[0] + '.json', 'w') as f:
    json.dump(rows, f, indent=1)
  if not a.keep:
    shutil.rmtree(tmp, ignore_errors=True)
  print('wrote', a.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
