#!/bin/sh
# Set up everything `make test` / `make demo` need on a fresh Debian 12 machine:
#   1. system tools listed in tools/system-packages.txt (apt-get when root, else stop
#      and name the packages);
#   2. python3-venv when `python3 -m venv` cannot work;
#   3. .venv with the project installed (editable) with its test extras; reinstalled
#      when pyproject.toml changes.
# Usage: tools/setup.sh TARGET   (TARGET: test or demo)
set -eu
target=${1:-test}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

say() { printf 'setup: %s\n' "$*" >&2; }

missing_pkgs=""
while read -r cmd pkg targets; do
    case "$cmd" in ''|'#'*) continue ;; esac
    case ",$targets," in *",$target,"*) ;; *) continue ;; esac
    case "$cmd" in
        /*) [ -e "$cmd" ] && continue ;;  # a file a package ships (firmware, GRUB modules)
        *) ! command -v "$cmd" >/dev/null 2>&1 || continue ;;
    esac
    if [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
        case " $missing_pkgs " in *" $pkg "*) ;; *) missing_pkgs="$missing_pkgs $pkg" ;; esac
    fi
done < tools/system-packages.txt

if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 && [ ! -x "$VENV/bin/python" ]; then
    missing_pkgs="$missing_pkgs python3-venv"
fi

if [ -n "$missing_pkgs" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing system packages:$missing_pkgs"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing_pkgs >/dev/null
    else
        say "missing system packages:$missing_pkgs"
        say "install them with: sudo apt-get install$missing_pkgs   (then run make again)"
        exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing ab-updater and its test tools into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test,hsm]'
    touch "$stamp"
fi
