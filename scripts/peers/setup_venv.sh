#!/usr/bin/env bash
# Creates the virtualenv for peer benchmarks only (never needed to build, run or test rwkvx):
# PyTorch and the official RWKV-X package 0.1.3 (the MoBA version of the spec) from PyPI.
set -euo pipefail
venv=${1:-.peer-venv}
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch numpy "rwkv-x==0.1.3"
echo "$venv ready"
