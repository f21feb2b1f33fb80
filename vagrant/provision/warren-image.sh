#!/usr/bin/env bash
# Puts warren's image into this node's containerd (namespace k8s.io, where the kubelet looks),
# under the exact name deploy/warren.yaml uses, so no registry is involved:
#  - from $IMAGE_TAR when it exists (built once on the host: see README.md), else
#  - built here from deploy/Dockerfile with buildah (about 15-25 minutes on 2 vCPUs).
set -euo pipefail

: "${IMAGE_TAR:?}"
export DEBIAN_FRONTEND=noninteractive
log() { printf '[%s warren-image] %s\n' "$(hostname)" "$*"; }

image=$(awk '$1 == "image:" { print $2; exit }' /warren/deploy/warren.yaml)
if [[ -z "$image" ]]; then
  echo "no image: line in /warren/deploy/warren.yaml" >&2
  exit 1
fi

if [[ -f "$IMAGE_TAR" ]]; then
  log "importing $IMAGE_TAR"
  ctr -n k8s.io images import "$IMAGE_TAR"
else
  log "building $image from deploy/Dockerfile (no $IMAGE_TAR on the host)"
  apt-get install -y -q buildah fuse-overlayfs >/dev/null
  buildah bud --layers -f /warren/deploy/Dockerfile -t "$image" /warren
  tar=/var/tmp/warren-image.tar
  rm -f "$tar"
  buildah push "$image" "docker-archive:$tar:$image"
  ctr -n k8s.io images import "$tar"
  rm -f "$tar"
fi

if ! ctr -n k8s.io images ls -q | grep -qxF "$image"; then
  echo "containerd has no $image after the import; it has:" >&2
  ctr -n k8s.io images ls -q >&2
  exit 1
fi
log "$image is in containerd"
