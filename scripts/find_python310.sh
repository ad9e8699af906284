#!/usr/bin/env bash
# Prints the path of a working Python 3.10 interpreter (the pinned TFX 1.15 needs Python < 3.11).
# pyenv shims answer "command not found" unless 3.10 is the selected version, so every candidate is
# actually run before it is accepted.
set -u
candidates=("${PYTHON310:-}" python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10)
for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin; do candidates+=("$dir/python3.10"); done
for py in "${candidates[@]}"; do
  [ -n "$py" ] || continue
  if out=$("$py" -c 'import sys; print(sys.executable if sys.version_info[:2] == (3, 10) else "")' 2>/dev/null) && [ -n "$out" ]; then
    echo "$out"; exit 0
  fi
done
echo "error: no working Python 3.10 found; install python3.10 (the pinned TFX 1.15 needs Python < 3.11) or set PYTHON310=/path/to/python3.10" >&2
exit 2
