#!/usr/bin/env bash
# On the development machine, from the repository root: everything the GPU run needs that does not travel with the
# working tree, into .device/ (ignored by git, carried with `carry: [".device"]`):
#
#   .device/tilelang-site.tar.xz    TileLang and its companions for Python 3.12 (../shared/device/tilelang-bundle.sh)
#   .device/tilelang-cache.tar.xz   the TileLang cache entries (sm_90a binaries) of the shipped kernels, as the build
#                                   manifest records them: the GPU run then only loads them instead of compiling
#   .device/acceptance.py           a copy of ../shared/verify/acceptance.py (../shared does not travel)
#   .device/commit.txt              the commit and whether the tree is dirty (.git does not travel)
#   .device/peers/*.whl             the bench's third-party baselines, pure-Python wheels for Python 3.12 (pip
#                                   download --no-deps; never committed): TileKernels (TileLang) and Liger (Triton);
#                                   the GPU run unpacks them onto PYTHONPATH
#
# and prints the size of everything that will travel against the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${MHC_SHARED:-../shared}
mkdir -p .device
[ -f .device/tilelang-site.tar.xz ] || "$shared/device/tilelang-bundle.sh" .device
install -m 0644 "$shared/verify/acceptance.py" .device/acceptance.py
# the bench's peers (the GPU machine reaches no registry); a failed download leaves the bench skipping that peer
mkdir -p .device/peers
for spec in tile-kernels==2.1.0 liger-kernel==0.8.5; do
  name=${spec%%==*}
  if ! ls .device/peers/"${name//-/_}-${spec##*==}"-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .device/peers "$spec" \
      || echo "could not download $spec: the bench will skip it on the GPU machine" >&2
  fi
done
{ git rev-parse HEAD; git status --porcelain --untracked-files=no | grep -q . && echo dirty || echo clean; date -u +%FT%TZ; } > .device/commit.txt
cache=${TILELANG_CACHE_DIR:-$HOME/.tilelang/cache}
version=$(python3 -c "import tilelang; print(tilelang.__version__)")
if [ -d "$cache/$version" ]; then
  # only the shipped kernels' entries (the cache also holds every experiment compiled here): refresh the build
  # manifest that records them (every kernel from the cache after `make`), then pack the entries it names
  python3 -m tl_kernels.build --quiet >/dev/null
  python3 -c "from tl_kernels.tools.build import shipped_cache_entries as e; print(*e(), sep=chr(10))" \
    > .device/cache-entries.txt
  tar -C "$cache" -cf - -T .device/cache-entries.txt | xz -T0 -6 > .device/tilelang-cache.tar.xz
  echo "packed $(wc -l < .device/cache-entries.txt) kernel cache entries (every shipped configuration)"
  rm -f .device/cache-entries.txt
else
  echo "no TileLang cache at $cache/$version: the GPU run will compile every kernel" >&2
  rm -f .device/tilelang-cache.tar.xz
fi
ls -l .device
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
dev=$(du -sb .device | cut -f1)
echo "travels: working tree $((tree / 1024)) KiB + .device $((dev / 1024)) KiB = $(((tree + dev) / 1048576)) MiB of 64 MiB"
if [ $((tree + dev)) -gt $((64 * 1048576)) ]; then
  echo "over the 64 MiB carry limit" >&2
  exit 1
fi
