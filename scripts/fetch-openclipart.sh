#!/usr/bin/env bash
# Builds the openclipart multi-label datasets (competition format) from Debian's public-domain
# openclipart-svg + openclipart-png packages. See docs/data.md.
#
# Usage: scripts/fetch-openclipart.sh [--demo] [--full]
#   --demo  (default) seeded subset of ~700 images, 24 labels -> data/demo/ (committed)
#   --full  every qualifying image (~3.3k, 60 labels)         -> data/openclipart-full/ (git-ignored)
# Downloads, extracted files and a small Python venv (Pillow only) live in data/.downloads/
# (git-ignored) and are reused on re-runs. Set PYTHON=/path/to/python to use an interpreter
# that already has Pillow instead of the venv (outputs are byte-identical for the same Pillow).
set -euo pipefail
cd "$(dirname "$0")/.."

PILLOW_VERSION=13.0.0
PACKAGES=(openclipart-svg openclipart-png)
DOWNLOADS=data/.downloads
EXTRACTED=$DOWNLOADS/extract/usr/share/openclipart

modes=()
for arg in "$@"; do
  case "$arg" in
    --demo) modes+=(demo) ;;
    --full) modes+=(full) ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (expected --demo and/or --full)" >&2; exit 2 ;;
  esac
done
[ ${#modes[@]} -gt 0 ] || modes=(demo)

mkdir -p "$DOWNLOADS"

# 1. Download the .deb files once (apt-get update only when the package lists lack them).
debs_present() { for p in "${PACKAGES[@]}"; do compgen -G "$DOWNLOADS/${p}_*.deb" >/dev/null || return 1; done; }
if ! debs_present; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
    echo "apt-get update (package lists lack ${PACKAGES[*]})" >&2
    $sudo apt-get update -qq
  fi
  (cd "$DOWNLOADS" && apt-get download "${PACKAGES[@]}")
fi

# 2. Extract once.
if [ ! -d "$EXTRACTED/svg" ] || [ ! -d "$EXTRACTED/png" ]; then
  rm -rf "$DOWNLOADS/extract"
  for p in "${PACKAGES[@]}"; do dpkg-deb -x "$(ls "$DOWNLOADS/${p}"_*.deb | sort | tail -1)" "$DOWNLOADS/extract"; done
fi
versions=$(for p in "${PACKAGES[@]}"; do
  printf '%s %s, ' "$p" "$(dpkg-deb -f "$(ls "$DOWNLOADS/${p}"_*.deb | sort | tail -1)" Version)"
done | sed 's/, $//')

# 3. Python with Pillow (pinned, so that re-encoded PNGs are byte-identical everywhere).
if [ -z "${PYTHON:-}" ]; then
  venv=$DOWNLOADS/venv
  if ! "$venv/bin/python" -c "import PIL, sys; sys.exit(PIL.__version__ != '$PILLOW_VERSION')" 2>/dev/null; then
    echo "creating $venv with pillow==$PILLOW_VERSION" >&2
    python3 -m venv "$venv" || { echo "python3 -m venv failed: install python3-venv (Debian/Ubuntu) or set PYTHON" >&2; exit 1; }
    "$venv/bin/pip" install --quiet "pillow==$PILLOW_VERSION"
  fi
  PYTHON=$venv/bin/python
fi

# 4. Build.
for mode in "${modes[@]}"; do
  out=data/demo; [ "$mode" = full ] && out=data/openclipart-full
  echo "building $out" >&2
  "$PYTHON" scripts/build_openclipart.py --src "$EXTRACTED" --out "$out" --mode "$mode" --versions "$versions"
  du -sh "$out" >&2
done
