#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) inside the new environment.yml env, from the working
# directory (the repository root): installs this checkout's voxelfm package into it.
set -euo pipefail
pip install --no-deps -e .
