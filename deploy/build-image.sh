#!/usr/bin/env bash
# `make image`: builds deploy/Dockerfile with the first working container engine (docker, podman,
# buildah), tagged as deploy/warren.yaml expects. Where none works it says so and exits 1; the
# definition is still checked statically by scripts/check-install.sh.
#   IMAGE=…   override the tag (default: the image deploy/warren.yaml runs)
#   SAVE=path also write the image as an archive (for vagrant/.cache/warren-image.tar)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${IMAGE:-$(awk '$1 == "image:" { print $2; exit }' "$repo/deploy/warren.yaml")}
[[ -n "$image" ]] || { echo "no image: line in deploy/warren.yaml" >&2; exit 2; }

engine=""
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null && podman info >/dev/null 2>&1; then
  engine=podman
elif command -v buildah >/dev/null; then
  engine=buildah
fi
if [[ -z "$engine" ]]; then
  reason="no container engine here"
  command -v docker >/dev/null && reason="the docker client is installed but no Docker daemon answers"
  echo "make image: not built: $reason (docker with a daemon, podman or buildah is needed)." >&2
  echo "deploy/Dockerfile is checked statically by scripts/check-install.sh." >&2
  exit 1
fi

echo "building $image with $engine"
case $engine in
  docker) DOCKER_BUILDKIT=1 docker build -f "$repo/deploy/Dockerfile" -t "$image" "$repo" ;;
  podman) podman build -f "$repo/deploy/Dockerfile" -t "$image" "$repo" ;;
  buildah) buildah bud --layers -f "$repo/deploy/Dockerfile" -t "$image" "$repo" ;;
esac

if [[ -n "${SAVE:-}" ]]; then
  mkdir -p "$(dirname "$SAVE")"
  case $engine in
    docker | podman) "$engine" save -o "$SAVE" "$image" ;;
    buildah) rm -f "$SAVE"; buildah push "$image" "docker-archive:$SAVE:$image" ;;
  esac
  echo "saved $image to $SAVE"
fi
