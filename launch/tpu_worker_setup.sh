#!/usr/bin/env bash
# Installs lm_align with jax[tpu] on a Cloud TPU VM worker.
#
# `lm-align launch tpu` and `lm-align sweep --executor tpu` copy the checkout to
# ~/lm_align on every worker and run this script there (through
# `gcloud compute tpus tpu-vm ssh --worker=all`). It is safe to run again: pip
# keeps what is already installed. Afterwards `python3 -m lm_align.cli ...`
# (the same as `lm-align ...`) works from ~/lm_align.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --upgrade pip
# jax[tpu] brings libtpu; the find-links page serves libtpu builds that PyPI lacks.
python3 -m pip install --quiet -e '.[tpu]' \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
python3 -c 'import lm_align, jax; print("lm_align installed; jax", jax.__version__)'
