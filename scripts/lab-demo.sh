#!/usr/bin/env bash
# `make lab`: the main job. Filled in as the lab lands (issue: warren-lab).
set -euo pipefail
echo "warren-lab is not there yet: the three-node lab lands with its issue." >&2
echo "Until then, 'make test' exercises the CNI plugin in real network namespaces." >&2
