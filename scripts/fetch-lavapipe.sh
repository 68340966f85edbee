#!/usr/bin/env bash
# A software GPU for the webgpu backend's tests: Mesa's lavapipe (a CPU Vulkan driver) from Debian's
# bookworm-backports (Mesa 25; Dawn refuses Debian 12's own Mesa 22.3: no dynamic indexing of
# uniform arrays), plus the Vulkan loader when the system has none, unpacked into DIR (default
# .cache/lavapipe in the checkout, git-ignored). Nothing is installed system-wide.
#   scripts/fetch-lavapipe.sh [DIR]   → DIR/env.sh sets VK_ICD_FILENAMES and LD_LIBRARY_PATH
# The tests (test/webgpu.test.ts) use DIR/env.sh when it exists and skip the webgpu runs otherwise.
# Debian/Ubuntu only (apt-get, dpkg-deb); the mirror is the one the system's apt sources name.
set -euo pipefail
cd "$(dirname "$0")/.."
L=$(mkdir -p "${1:-.cache/lavapipe}" && cd "${1:-.cache/lavapipe}" && pwd)
lib="$L/root/usr/lib/x86_64-linux-gnu"
if [ ! -f "$L/env.sh" ]; then
  [ "$(dpkg --print-architecture)" = amd64 ] || { echo "fetch-lavapipe: amd64 only" >&2; exit 1; }
  mkdir -p "$L/lists" "$L/parts" "$L/root"
  src=$(ls /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  uri=$( { [ -n "$src" ] && awk '/^URIs:/{print $2; exit}' "$src"; } || true)
  uri=${uri:-http://deb.debian.org/debian}
  printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" > "$L/parts/bpo.sources"
  o=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$L/parts" -o "Dir::State::Lists=$L/lists"
     -o "Dir::Cache=$L/cache" -o "Debug::NoLocking=1")
  apt-get "${o[@]}" update >/dev/null
  pkgs=(mesa-vulkan-drivers/bookworm-backports)
  ldconfig -p | grep -q 'libvulkan.so.1 ' || pkgs+=(libvulkan1/bookworm)
  (cd "$L" && apt-get "${o[@]}" download "${pkgs[@]}" 2>/dev/null >/dev/null)
  for deb in "$L"/*.deb; do dpkg-deb -x "$deb" "$L/root"; done
  rm -f "$L"/*.deb
  printf '{"file_format_version":"1.0.0","ICD":{"library_path":"%s","api_version":"1.3.0"}}\n' "$lib/libvulkan_lvp.so" > "$L/icd.json"
  missing=$(LD_LIBRARY_PATH="$lib" ldd "$lib/libvulkan_lvp.so" | grep 'not found' || true)
  [ -z "$missing" ] || { echo "fetch-lavapipe: lavapipe needs libraries this system lacks:" >&2; echo "$missing" >&2; exit 1; }
  printf 'export VK_ICD_FILENAMES=%s\nexport LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "$L/icd.json" "$lib" > "$L/env.sh"
fi
cat "$L/env.sh"
