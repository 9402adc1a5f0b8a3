#!/usr/bin/env bash
# Builds Mosquitto 2.1.2 (the broker the plugin tests load flowgate into) from
# ../shared/vendor/mosquitto-2.1.2.tar.gz, once: the build is kept outside the
# clone, in $FLOWGATE_CACHE (default ~/.cache/flowgate), and reused while the
# tarball is the same. Prints the broker's path; its headers are beside it
# (include/). Needs cmake, libcjson-dev, libssl-dev (.ci/run installs them).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tarball=${MOSQUITTO_TARBALL:-$root/../shared/vendor/mosquitto-2.1.2.tar.gz}
cache=${FLOWGATE_CACHE:-$HOME/.cache/flowgate}
[ -f "$tarball" ] || { echo "no Mosquitto source at $tarball" >&2; exit 1; }
sum=$(sha256sum "$tarball" | cut -c1-16)
dir=$cache/mosquitto-2.1.2-$sum
if [ ! -x "$dir/src/build/src/mosquitto" ]; then
  rm -rf "$dir" && mkdir -p "$dir"
  tar xzf "$tarball" -C "$dir"
  mv "$dir"/mosquitto-* "$dir/src"
  (cd "$dir/src" \
    && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DWITH_TESTS=OFF -DWITH_DOCS=OFF \
         -DWITH_CLIENTS=OFF -DWITH_APPS=OFF -DWITH_PLUGINS=OFF -DWITH_CTRL_SHELL=OFF \
         -DWITH_LTO=OFF >"$dir/cmake.log" 2>&1 \
    && cmake --build build -j2 >>"$dir/cmake.log" 2>&1) \
    || { tail -40 "$dir/cmake.log" >&2; echo "building Mosquitto 2.1.2 failed (log: $dir/cmake.log)" >&2; exit 1; }
fi
echo "$dir/src/build/src/mosquitto"
