#!/usr/bin/env bash
# Set up, then generate text. With GROKLM_CHECKPOINT set, from that checkpoint; otherwise from a
# random-weight `mini` checkpoint (Grok-1 architecture and vocabulary) made here in runs/mini.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ckpt="${GROKLM_CHECKPOINT:-runs/mini}"
tokenizer="${GROKLM_TOKENIZER:-../shared/tokenizer/grok-1/tokenizer.model}"
if [ -z "${GROKLM_CHECKPOINT:-}" ] && [ ! -d runs/mini/ckpt-0 ]; then
  groklm init-random --preset mini runs/mini
fi
groklm info --checkpoint "$ckpt"
if [ -f "$tokenizer" ] || [ -f "$ckpt/tokenizer.model" ]; then
  tok=(); [ -f "$ckpt/tokenizer.model" ] || tok=(--tokenizer "$tokenizer")
  groklm generate --checkpoint "$ckpt" "${tok[@]}" --max-new-tokens 40 \
    "The answer to life the universe and everything is of course"
  groklm generate --checkpoint "$ckpt" "${tok[@]}" --max-new-tokens 40 --temperature 0.8 --top-p 0.95 --seed 1 "Once upon a time"
else
  echo "(no tokenizer.model found: set GROKLM_TOKENIZER; generating from token ids instead)"
  groklm generate --checkpoint "$ckpt" --prompt-ids 422,3033,356,1180,333,9072 --max-new-tokens 40
fi
