#!/usr/bin/env bash
# Installs Debian's nix-bin into a folder (no root, nothing under /nix or ~) so that tests can parse
# flake.nix offline with `nix-instantiate --parse`. Nix builds do not work with it (too old, no
# store); it is only a parser. Prints the path of the nix-instantiate wrapper it writes.
#   usage: bash ci/install-nix-parser.sh [DIR]          (default: .cache/nix-parser in the repository)
# Needs apt package lists (run `apt-get update` once as root on a fresh machine) and dpkg; Debian
# 12 (bookworm) names the packages below. tests/test_flake.py finds the wrapper in the default DIR,
# or through NIX_INSTANTIATE.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mkdir -p "${1:-.cache/nix-parser}" && cd "${1:-.cache/nix-parser}" && pwd)
wrapper="$dir/bin/nix-instantiate"
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
  echo "$wrapper"
  exit 0
fi
mkdir -p "$dir/debs" "$dir/root" "$dir/bin" "$dir/state/store" "$dir/state/var" "$dir/state/log" "$dir/state/conf" "$dir/state/home"
(
  cd "$dir/debs"
  if ! apt-get download nix-bin libgc1 libcpuid16 libboost-context1.74.0 >apt.log 2>&1; then
    cat apt.log >&2
    echo "install-nix-parser: apt-get download failed; on a fresh machine run 'apt-get update' first" >&2
    exit 1
  fi
  for deb in ./*.deb; do dpkg -x "$deb" "$dir/root"; done
)
# Keep every path nix touches inside $dir: its store, state, logs, configuration and home.
printf 'build-users-group =\nexperimental-features = nix-command flakes\n' > "$dir/state/conf/nix.conf"
cat > "$wrapper" <<WRAPPER
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$dir/root/usr/lib/nix:$dir/root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export NIX_STORE_DIR="$dir/state/store" NIX_STATE_DIR="$dir/state/var" NIX_LOG_DIR="$dir/state/log"
export NIX_CONF_DIR="$dir/state/conf" HOME="$dir/state/home"
exec "$dir/root/usr/bin/nix-instantiate" "\$@"
WRAPPER
chmod +x "$wrapper"
"$wrapper" --version >/dev/null
echo "$wrapper"
