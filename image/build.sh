#!/usr/bin/env bash
# Ballast's container images, built without a Docker daemon: `make image` runs this
# after `cargo build --release`.
#
# Every `image` of image/contents is built from scratch: its binary from
# $CARGO_TARGET_DIR/release/, stripped of debug info, the shared libraries and files the
# list names, copied from this host's Debian, and its passwd, group and nsswitch lines;
# it runs as user 65532 with the binary as entrypoint and needs nothing writable (pods
# mount an emptyDir at /tmp). umoci assembles each image; it is written as an OCI
# archive that `ctr images import` and `skopeo copy oci-archive:...` accept:
#
#   $BALLAST_CACHE/images/<name>-<version>-<commit>.oci.tar
#
# tagged <version>-<commit> and <version> (the workspace's version; the commit gets a
# `-dirty` suffix when tracked files differ from it), with containerd image names
# $BALLAST_IMAGE_REPOSITORY/<name>:<tag> (an archive holds both tags, so skopeo needs
# one: oci-archive:FILE:TAG). The newest archive of each image replaces the
# older ones. Sizes at 0.1.0 (amd64), which this script prints: ballast-operator 14.5 MiB
# as an archive, 38 MiB unpacked; ballast-worker 57.5 MiB and 168 MiB; of each, the
# libraries, certificates and user files both share (one layer, the same digest in
# both) take 3.4 MiB, 1.7 MiB packed.
#
# image/Containerfile builds the same images with Docker or Podman.
#
# Environment: BALLAST_CACHE (~/.cache/ballast), CARGO_TARGET_DIR ($BALLAST_CACHE/target),
# BALLAST_IMAGE_BIN_DIR (the binaries; $CARGO_TARGET_DIR/release),
# BALLAST_IMAGE_REPOSITORY (ghcr.io/ballast-dev), BALLAST_IMAGE_OUT (where the archives go;
# $BALLAST_CACHE/images), BALLAST_IMAGE_TAG (the first tag; <version>-<commit>; the real
# node's scenario builds its own from the debug binaries), SOURCE_DATE_EPOCH (the time every file
# and the image config carry; the commit's time, so a rebuild gives the same layers).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
contents=$here/contents

: "${BALLAST_CACHE:=$HOME/.cache/ballast}"
: "${CARGO_TARGET_DIR:=$BALLAST_CACHE/target}"
: "${BALLAST_IMAGE_BIN_DIR:=$CARGO_TARGET_DIR/release}"
: "${BALLAST_IMAGE_REPOSITORY:=ghcr.io/ballast-dev}"
out=${BALLAST_IMAGE_OUT:-$BALLAST_CACHE/images}

die() { echo "image: $*" >&2; exit 1; }
say() { echo "image: $*"; }

# --- tools --------------------------------------------------------------------

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else
    command -v sudo >/dev/null 2>&1 || die "missing tool 'sudo' (installing Debian packages)"
    sudo "$@"
  fi
}

# Debian packages this script runs, keyed by a file they install (as e2e/stack/stack.sh).
apt_packages=(
  /usr/bin/umoci:umoci
  # Checks each archive as a registry client reads it.
  /usr/bin/skopeo:skopeo
  /usr/bin/jq:jq
  /usr/bin/strip:binutils
  /usr/bin/readelf:binutils
  /etc/ssl/certs/ca-certificates.crt:ca-certificates
)

install_packages() {
  local missing=() entry log=$out/apt.log
  for entry in "${apt_packages[@]}"; do
    [ -e "${entry%%:*}" ] || missing+=("${entry#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  command -v apt-get >/dev/null 2>&1 || die "missing Debian packages ${missing[*]}: install them first"
  say "installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 ||
    die "apt-get update failed (see $log)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >>"$log" 2>&1 || die "apt-get install ${missing[*]} failed (see $log)"
}

# --- the list -------------------------------------------------------------------

images=() # "NAME PATH"
libs=()
files=()
texts=() # "PATH<tab>LINE"
user=

read_contents() {
  local kind first rest
  while read -r kind first rest; do
    case $kind in
      '' | '#'*) ;;
      image) images+=("$first $rest") ;;
      lib) libs+=("$first") ;;
      file) files+=("$first") ;;
      text) texts+=("$first"$'\t'"$rest") ;;
      user)
        [ -z "$user" ] || die "image/contents names two users"
        user=$first
        ;;
      *) die "image/contents: unknown entry '$kind'" ;;
    esac
  done <"$contents"
  [ ${#images[@]} -gt 0 ] || die "image/contents names no image"
  [[ $user =~ ^[0-9]+:[0-9]+$ ]] || die "image/contents: user '$user' is not UID:GID"
  [[ $user != 0:* ]] || die "image/contents: the images must not run as root"
}

# The loader an executable names (empty for a library).
interpreter_of() { readelf -l "$1" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p'; }

# Fails unless every library FILE links (and its interpreter) is in the list: an image
# missing one would not start.
check_links() { # file
  local needed soname lib found
  needed=$(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p')
  for soname in $needed; do
    found=
    for lib in "${libs[@]}"; do [ "${lib##*/}" = "$soname" ] && found=1; done
    [ -n "$found" ] || die "$1 links $soname, which image/contents does not list"
  done
  local interp
  interp=$(interpreter_of "$1")
  if [ -n "$interp" ] && ! printf '%s\n' "${libs[@]}" | grep -qxF "$interp"; then
    die "$1 is loaded by $interp, which image/contents does not list"
  fi
}

# --- building ---------------------------------------------------------------------

# Sets every time in a tree to SOURCE_DATE_EPOCH, so the layers depend on content only.
settle_times() { find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +; }

# The files both images share: libraries, other files, text files.
stage_shared() { # dir
  local path entry
  for path in "${libs[@]}" "${files[@]}"; do
    [ -e "$path" ] || die "$path (image/contents) is missing on this host"
    mkdir -p "$1$(dirname "$path")"
    # -L: Debian's paths are often symlinks (libz.so.1, the loader); the image gets the file.
    cp -L --preserve=mode "$path" "$1$path"
  done
  for path in "${libs[@]}"; do check_links "$1$path"; done
  for entry in "${texts[@]}"; do
    path=${entry%%$'\t'*}
    mkdir -p "$1$(dirname "$path")"
    printf '%s\n' "${entry#*$'\t'}" >>"$1$path"
    chmod 0644 "$1$path"
  done
  settle_times "$1"
}

# One image's OCI layout: a layer of the shared files, a layer of the binary, the config.
build_layout() { # name path shared-dir binary-dir layout
  local name=$1 path=$2 shared=$3 bins=$4 layout=$5
  local bundle=$work/bundle-$name created
  created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
  # Without root, umoci maps this user to root in the layers (files stay owned by 0:0).
  local rootless=()
  [ "$(id -u)" -eq 0 ] || rootless=(--rootless)

  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci unpack "${rootless[@]}" --image "$layout:$tag" "$bundle" >/dev/null
  # umoci repack turns what changed in the bundle's rootfs into a layer (umoci insert
  # would be shorter, but Debian's 0.4.7 writes its layers without the tar trailer).
  cp -a "$shared/." "$bundle/rootfs/"
  umoci repack --refresh-bundle --image "$layout:$tag" --history.created "$created" \
    --history.created_by "image/build.sh: libraries and files of image/contents" "$bundle"
  cp -a "$bins/." "$bundle/rootfs/"
  umoci repack --image "$layout:$tag" --history.created "$created" \
    --history.created_by "image/build.sh: $path" "$bundle"
  umoci config --image "$layout:$tag" --no-history --created "$created" \
    --architecture "$arch" --os linux \
    --config.user "$user" --config.entrypoint "$path" \
    --config.label "org.opencontainers.image.title=$name" \
    --config.label "org.opencontainers.image.version=$tag" \
    --config.label "org.opencontainers.image.revision=$revision" \
    --config.label "org.opencontainers.image.licenses=Apache-2.0"
  umoci tag --image "$layout:$tag" "$version"
  umoci gc --layout "$layout"
  # ctr names an imported image by io.containerd.image.name (it drops bare tags).
  jq --arg name "$BALLAST_IMAGE_REPOSITORY/$name" --arg arch "$arch" \
    '.manifests |= map(
       .annotations["io.containerd.image.name"] =
         $name + ":" + .annotations["org.opencontainers.image.ref.name"]
       | .platform = {architecture: $arch, os: "linux"})' \
    "$layout/index.json" >"$work/index.json"
  mv "$work/index.json" "$layout/index.json"
}

# An archive is the layout as a tar, written in the work directory and then moved (the
# same file system), so none is ever half-written.
write_archive() { # layout archive
  tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    -C "$1" -cf "$work/archive.tar" oci-layout index.json blobs
  mv "$work/archive.tar" "$2"
}

# Fails unless a registry client reads the archive as built: its user and entrypoint.
check_archive() { # archive path
  local ref config
  for ref in "$tag" "$version"; do
    config=$(skopeo inspect --config "oci-archive:$1:$ref") ||
      die "skopeo cannot read $1 ($ref)"
    [ "$(jq -r '.config.User' <<<"$config")" = "$user" ] || die "$1 ($ref): user is not $user"
    [ "$(jq -c '.config.Entrypoint' <<<"$config")" = "[\"$2\"]" ] ||
      die "$1 ($ref): entrypoint is not $2"
  done
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

main() {
  mkdir -p "$out"
  install_packages
  read_contents

  version=$(awk -F'"' '/^\[workspace.package\]/ { p = 1 } p && /^version *=/ { print $2; exit }' \
    "$repo/Cargo.toml")
  [ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"
  revision=$(git -C "$repo" rev-parse HEAD) || die "not a git checkout: the tag names the commit"
  local commit
  commit=$(git -C "$repo" rev-parse --short HEAD)
  git -C "$repo" diff --quiet HEAD -- || commit=$commit-dirty
  tag=${BALLAST_IMAGE_TAG:-$version-$commit}
  : "${SOURCE_DATE_EPOCH:=$(git -C "$repo" log -1 --format=%ct)}"
  arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)

  work=$(mktemp -d "$out/.build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  stage_shared "$work/shared"
  local shared_bytes
  shared_bytes=$(du -sb "$work/shared" | cut -f1)

  local entry name path bin archive summary=()
  for entry in "${images[@]}"; do
    read -r name path <<<"$entry"
    bin=$BALLAST_IMAGE_BIN_DIR/$name
    [ -x "$bin" ] || die "no binary $bin: run \`make image\` (it builds the release binaries first)"
    check_links "$bin"
    mkdir -p "$work/bin-$name$(dirname "$path")"
    strip --strip-debug -o "$work/bin-$name$path" "$bin"
    chmod 0755 "$work/bin-$name$path"
    settle_times "$work/bin-$name"
    # It starts with the listed libraries alone: the image's loader, its library paths.
    local interp lib_path
    interp=$(interpreter_of "$bin")
    lib_path=$(printf '%s\n' "${libs[@]%/*}" | sort -u | sed "s|^|$work/shared|" | paste -sd:)
    "$work/shared$interp" --inhibit-cache --library-path "$lib_path" \
      "$work/bin-$name$path" --help >/dev/null ||
      die "$name does not start with the libraries of image/contents"

    build_layout "$name" "$path" "$work/shared" "$work/bin-$name" "$work/layout-$name"
    archive=$out/$name-$tag.oci.tar
    write_archive "$work/layout-$name" "$archive"
    check_archive "$archive" "$path"
    find "$out" -maxdepth 1 -name "$name-*.oci.tar" ! -name "${archive##*/}" -delete
    local unpacked archived
    unpacked=$((shared_bytes + $(du -sb "$work/bin-$name" | cut -f1)))
    archived=$(stat -c %s "$archive")
    summary+=("$(printf '%-18s %s archive, %s unpacked  %s' "$name" "$(mib "$archived")" \
      "$(mib "$unpacked")" "$archive")")
  done
  say "built $tag (also tagged $version) as $BALLAST_IMAGE_REPOSITORY/<name>:"
  printf '  %s\n' "${summary[@]}"
}

main "$@"
