# Sourced by ops/run and ops/test: make .venv with the pinned dependencies, once per change.
# A stamp of pyproject.toml and the constraints file decides whether pip runs again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "talkwire needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
VENV="$ROOT/.venv"
STAMP="$VENV/.talkwire-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/ops/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "ops: preparing $VENV (pinned dependencies)..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  LOG="$VENV/pip-install.log"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check \
      -c "$ROOT/ops/constraints.txt" -e "$ROOT[test]" > "$LOG" 2>&1; then
    tail -40 "$LOG" >&2
    echo "ops: pip install failed; full log in $LOG" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# platformdirs (through pgserver) warns without it; a private runtime dir is harmless.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/talkwire-runtime-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
