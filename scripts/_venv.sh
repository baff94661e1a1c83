# Sourced by scripts/run and scripts/test: make .venv with a Python >= 3.11
# and install the project into it, so neither command needs a system pip.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

find_python() {
    for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "convlock needs Python 3.11 or newer on PATH (or set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    python="$(find_python)"
    if ! "$python" -m venv .venv 2>/dev/null; then
        # Debian's python3 lacks ensurepip until python3-venv is installed.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            # scripts/test may have apt running in the background: one apt at a time.
            if [ -n "${apt_job:-}" ]; then
                wait "$apt_job" || true
                apt_job=""
            fi
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            "$python" -m venv .venv
        else
            echo "cannot create a virtual environment: install python3-venv" >&2
            exit 1
        fi
    fi
fi
venv_python="$root/.venv/bin/python"

pip_install() {
    # Some machines' pip.conf names extra index folders that do not exist;
    # pip warns about each one on every call, which buries real errors.
    "$venv_python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
# Reinstall only when pyproject.toml changed since the last install.
stamp=".venv/.convlock-installed-$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # The venv's own pip (ensurepip's, 23.2 on Python 3.11) installs all of
    # this; upgrading it first only cost a download on every fresh machine.
    pip_install -e ".$2"
    touch "$stamp"
fi
