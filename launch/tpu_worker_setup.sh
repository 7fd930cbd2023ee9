#!/usr/bin/env bash
# Installs lm_align with jax[tpu] on a Cloud TPU VM worker and, with --bucket,
# mounts a Cloud Storage bucket there with gcsfuse.
#
#   bash launch/tpu_worker_setup.sh [--bucket BUCKET --mount-dir DIR]
#
# `lm-align launch tpu` and `lm-align sweep --executor tpu` copy the checkout to
# ~/lm_align on every worker and run this script there (through
# `gcloud compute tpus tpu-vm ssh --worker=all`). It is safe to run again: pip
# keeps what is already installed, and a bucket already mounted stays mounted.
# Afterwards `python3 -m lm_align.cli ...` (the same as `lm-align ...`) works
# from ~/lm_align.
#
# --bucket BUCKET --mount-dir DIR mounts gs://BUCKET at DIR (relative to the
# home directory) with gcsfuse, installing gcsfuse first if it is missing. Every
# worker mounts it at the same path, so the processes of a run over several
# hosts write one run directory, and the run directory outlives the TPU VM. The
# VM's service account needs read and write access to the bucket (e.g. the role
# roles/storage.objectUser on it).
set -euo pipefail

# Directory renames are how orbax completes a checkpoint (it writes each step
# to a temporary directory and renames it). gcsfuse refuses to rename a
# directory on a bucket without hierarchical namespace unless it holds fewer
# objects than --rename-dir-limit (default 0); a checkpoint step holds far
# fewer objects than this.
RENAME_DIR_LIMIT=200000

install_gcsfuse() {
  # The Cloud Storage FUSE install commands for Debian and Ubuntu (see
  # https://cloud.google.com/storage/docs/cloud-storage-fuse/install): the
  # gcsfuse apt repository of this release, signed by Google's Cloud packages
  # key. The gcsfuse package pulls in fuse.
  local repo
  repo="gcsfuse-$(lsb_release -c -s)"
  echo "setup: installing gcsfuse (apt repository ${repo})"
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt ${repo} main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  # A new VM may still be running its boot-time package updates: wait for apt's lock.
  sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse
}

# mount_bucket BUCKET DIR: mounts gs://BUCKET at DIR with gcsfuse unless it is
# mounted there already; then checks that this worker can write to it.
mount_bucket() {
  local bucket="$1" dir="$2"
  command -v gcsfuse >/dev/null || install_gcsfuse
  if grep -qs " ${dir} " /proc/mounts && ! ls "$dir" >/dev/null 2>&1; then
    # Mounted, but its gcsfuse process is gone ("Transport endpoint is not connected").
    echo "setup: the mount at ${dir} is stale; mounting gs://${bucket} again"
    fusermount -u "$dir" 2>/dev/null || fusermount3 -u "$dir"
  fi
  mkdir -p "$dir"
  if mountpoint -q "$dir"; then
    echo "setup: gs://${bucket} is already mounted at ${dir}"
  else
    gcsfuse --implicit-dirs --rename-dir-limit="$RENAME_DIR_LIMIT" "$bucket" "$dir"
    echo "setup: mounted gs://${bucket} at ${dir}"
  fi
  local probe
  probe="${dir}/.lm_align_write_test_$(hostname)_$$"
  if ! { : >"$probe" && rm -f "$probe"; }; then
    echo "setup: cannot write to gs://${bucket} (mounted at ${dir}): give the TPU VM's" \
      "service account read and write access to the bucket (e.g. roles/storage.objectUser)" >&2
    return 1
  fi
}

main() {
  local bucket="" mount_dir=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --bucket) bucket="${2:?--bucket needs a bucket name}"; shift 2 ;;
      --mount-dir) mount_dir="${2:?--mount-dir needs a directory}"; shift 2 ;;
      *) echo "usage: $0 [--bucket BUCKET --mount-dir DIR]" >&2; return 2 ;;
    esac
  done
  if [ -n "$bucket" ] || [ -n "$mount_dir" ]; then
    if [ -z "$bucket" ] || [ -z "$mount_dir" ]; then
      echo "usage: $0 [--bucket BUCKET --mount-dir DIR]: give both or neither" >&2
      return 2
    fi
    case "$mount_dir" in /*) ;; *) mount_dir="${HOME}/${mount_dir}" ;; esac
    # Mounted first: a bucket that does not exist or cannot be written fails
    # the setup before the (slower) installation.
    mount_bucket "$bucket" "$mount_dir"
  fi
  cd "$(dirname "$0")/.."
  python3 -m pip install --quiet --upgrade pip
  # jax[tpu] brings libtpu; the find-links page serves libtpu builds that PyPI lacks.
  python3 -m pip install --quiet -e '.[tpu]' \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python3 -c 'import lm_align, jax; print("lm_align installed; jax", jax.__version__)'
}

# Run, not sourced (tests source this file to call mount_bucket with fakes).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
