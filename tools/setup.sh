#!/bin/sh
# Set up everything `make test` / `make demo` need on a fresh Debian 12 machine:
#   1. system tools listed in tools/system-packages.txt (apt-get when root, else stop
#      and name the packages); after apt-get, every listed command and file must exist,
#      else stop with one line naming the command and the package that did not ship it;
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

# present CMD: is the command (or, for an absolute path, the file) there?
present() {
    case "$1" in
        /*) [ -e "$1" ] ;;  # a file a package ships (firmware, GRUB modules)
        *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] ;;
    esac
}

# rows: the "command package" pairs of the system-packages.txt rows for $target.
rows() {
    while read -r cmd pkg targets; do
        case "$cmd" in ''|'#'*) continue ;; esac
        case ",$targets," in *",$target,"*) printf '%s %s\n' "$cmd" "$pkg" ;; esac
    done < tools/system-packages.txt
}

missing_pkgs=""
for_missing() {
    rows | while read -r cmd pkg; do
        present "$cmd" || printf '%s %s\n' "$cmd" "$pkg"
    done
}
for pkg in $(for_missing | awk '{print $2}' | sort -u); do
    missing_pkgs="$missing_pkgs $pkg"
done

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
        # A package that installed but does not ship what its row names (a renamed or
        # split package) must fail here, on every machine - not later in the tests.
        still=$(for_missing)
        if [ -n "$still" ]; then
            echo "$still" | while read -r cmd pkg; do
                say "error: package $pkg is installed but $cmd is still missing; fix its row in tools/system-packages.txt"
            done
            exit 1
        fi
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
    # PEP 660 editable install in setuptools' default ("lenient") mode: an import hook
    # maps the declared packages to this tree, so new modules are found without a
    # reinstall (the "compat" mode used before is deprecated and will be removed).
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,hsm]'
    touch "$stamp"
fi
