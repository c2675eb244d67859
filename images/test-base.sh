#!/usr/bin/env bash
# Prepares what the image test needs on a machine without a container daemon or registry
# access: buildah and mmdebstrap (Debian packages, installed when missing; needs root), and a
# Debian bookworm base image made from Debian's packages (standing in for the Dockerfiles'
# public bases), cached in the test's own container storage. Prints the buildah global flags
# to use (storage), then the base image's name, one per line.
set -euo pipefail
cache=${GONKA_CACHE_DIR:-$HOME/.cache/gonka-operator}/containers
base=localhost/gonka-test/debian-base:bookworm
flags=(--root "$cache/storage" --runroot "$cache/run" --storage-driver vfs)

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test-base.sh: ${need[*]} missing; install them (Debian: apt-get install ${need[*]}) or run as root" >&2
    exit 1
  fi
  echo "test-base.sh: installing ${need[*]} from Debian's packages" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2; }
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if ! buildah "${flags[@]}" images -q "$base" 2>/dev/null | grep -q .; then
  echo "test-base.sh: making $base with mmdebstrap (glibc, libstdc++, CA roots)" >&2
  # The .tar suffix tells mmdebstrap to write a tarball.
  tar="$cache/debian-base.tar"
  mmdebstrap --quiet --variant=essential --include=ca-certificates,libstdc++6 --mode=root bookworm "$tar" >&2
  ctr=$(buildah "${flags[@]}" from scratch)
  buildah "${flags[@]}" add "$ctr" "$tar" / >&2
  buildah "${flags[@]}" commit -q "$ctr" "$base" >&2
  buildah "${flags[@]}" rm "$ctr" >&2
  rm -f "$tar"
fi
printf '%s\n' "${flags[@]}"
echo "$base"
