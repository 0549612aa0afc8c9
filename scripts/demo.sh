#!/usr/bin/env bash
# Set up, then show the whole path on this machine, offline: train a small Grok-architecture model
# (8 experts, top 2) for about two minutes on the Python standard library's own docstrings, save it in
# groklm's layout, load it back and generate from it. With GROKLM_CHECKPOINT set, generate from that
# checkpoint instead (the real Grok-1, say). GROKLM_DEMO_STEPS changes the training steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

if [ -n "${GROKLM_CHECKPOINT:-}" ]; then
  groklm info --checkpoint "$GROKLM_CHECKPOINT"
  groklm generate --checkpoint "$GROKLM_CHECKPOINT" --max-new-tokens 40 \
    "The answer to life the universe and everything is of course"
  exit 0
fi

out=runs/demo
rm -rf "$out"
mkdir -p "$out"
.venv/bin/python -c "from groklm.train.data import write_docstrings as w; print(f'{w(\"$out/docs.txt\") / 1e6:.1f} MB of text')"
steps="${GROKLM_DEMO_STEPS:-120}"
echo "== training a 'tiny' Grok (9.8 M parameters, 8 experts, top 2) on the Python standard library's docstrings:" \
     "$steps steps of 4096 tokens (about 2 minutes on 2 cores; stopped early after ${GROKLM_DEMO_SECONDS:-240} s)"
groklm train --preset tiny --data "$out/docs.txt" --train-tokenizer 2048 --out "$out/run" --steps "$steps" \
  --warmup 15 --eval-every 40 --time-limit "${GROKLM_DEMO_SECONDS:-240}"
echo "== the loss curve is in $out/run/loss.png; the model, in groklm's layout, in $out/run/model"
echo "== generating from the trained model (loaded from $out/run/model):"
for prompt in "The" "Return the" "This module provides"; do
  groklm generate --checkpoint "$out/run/model" --dtype fp32 --max-new-tokens 50 --temperature 0.7 --top-k 40 \
    --seed 1 "$prompt"
  echo "--"
done
