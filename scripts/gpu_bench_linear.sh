#!/usr/bin/env bash
# Full-size dense-vs-structured linear bench on one GPU (H200: about 3-5 min); results under $OUT. Run from the repo root.
set -o pipefail; PYTHONPATH=src python -m mmm bench --cases 'linear.*' --no-progress --json "${OUT:-.}/bench_linear.json" --markdown "${OUT:-.}/bench_linear.md" --plot "${OUT:-.}/bench_linear.png" 2>&1 | tee "${OUT:-.}/bench_linear.log"
