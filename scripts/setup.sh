#!/usr/bin/env bash
# Idempotent set-up: a venv at $VENV (default .venv) with the pinned stack, the project installed
# editable, and the Debian packages the data pipelines need (espeak-ng + MBROLA voices).
# Re-running is cheap: each step is skipped when its stamp matches.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

# --- Debian packages: espeak-ng + MBROLA diphone voices (contrib/non-free; research use only). ---
need_apt=0
for bin in espeak-ng mbrola; do command -v "$bin" >/dev/null 2>&1 || need_apt=1; done
[ -d /usr/share/mbrola/us1 ] || need_apt=1
if [ "$need_apt" = 1 ] && [ "${JAXSPEECH_SKIP_APT:-0}" != 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    $SUDO sed -i 's/^Components: main$/Components: main contrib non-free/' /etc/apt/sources.list.d/debian.sources
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    espeak-ng mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 >/dev/null
fi

# --- Python environment. ---
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.jaxspeech-setup"
want=$(cat requirements.txt requirements-dev.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c "import jax, flax, optax, orbax.checkpoint, grain, ml_collections, einops, clu, soundfile, torch, transformers" 
  echo "$want" > "$stamp"
fi
