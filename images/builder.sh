#!/usr/bin/env bash
# Print the first usable container builder: "docker buildx", "docker", "podman" or "buildah".
# "Usable" means it can build now (docker's daemon answers, podman/buildah can run), not just
# that the command exists. With none, explain what was tried and how to fix it, and exit 1.
set -uo pipefail

tried=()
if command -v docker >/dev/null 2>&1; then
    if docker info >/dev/null 2>&1; then
        if docker buildx version >/dev/null 2>&1; then
            echo "docker buildx"; exit 0
        fi
        echo "docker"; exit 0
    fi
    tried+=("docker buildx / docker: 'docker' is installed but 'docker info' failed (is the Docker daemon running and may this user reach it?)")
else
    tried+=("docker buildx / docker: not installed")
fi
for tool in podman buildah; do
    if command -v "$tool" >/dev/null 2>&1; then
        if "$tool" info >/dev/null 2>&1; then
            echo "$tool"; exit 0
        fi
        tried+=("$tool: installed but '$tool info' failed")
    else
        tried+=("$tool: not installed")
    fi
done

{
    echo "error: no usable container builder found. Tried, in order:"
    for line in "${tried[@]}"; do echo "  - $line"; done
    echo "Install one of Docker (with buildx and a running daemon), Podman or Buildah, then rerun;"
    echo "or name one explicitly: make build-images BUILDER=podman"
} >&2
exit 1
