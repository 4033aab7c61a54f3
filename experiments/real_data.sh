#!/usr/bin/env bash
# Issue-3 figures on real data: MiniLM on SST-2 and CoNLL-2003, SmolLM2-135M on E2E.
# Usage: bash experiments/real_data.sh [sst2|conll|e2e ...]   (default: all three)
# Needs ../shared/data (skips cleanly without it); writes runs/<name>/ and
# experiments/results/real_data_<name>.json (the summary of each run).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data
LORAKIT=${LORAKIT:-.venv/bin/lorakit}
mkdir -p experiments/results
if [ ! -d "$DATA" ]; then echo "skip: $DATA not found (real data sets are not shipped with lorakit)"; exit 0; fi

run() {  # name, then lorakit train options
  local name=$1; shift
  local start=$SECONDS
  "$LORAKIT" train --output "runs/$name" --quiet "$@"
  python3 - "$name" $((SECONDS - start)) <<'PY'
import json, sys
name, wall = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(f"runs/{name}/logs/metrics.jsonl")]
evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
json.dump({"name": name, "wall_s": wall, "evals": evals, "last_log": [r for r in rows if "loss" in r][-1]},
          open(f"experiments/results/real_data_{name}.json", "w"), indent=1)
PY
}

[ $# -gt 0 ] || set -- sst2 conll e2e
for what in "$@"; do
  case $what in
    sst2) run sst2 --model minilm --task classification --data $DATA/sst2/train.tsv --eval-data $DATA/sst2/dev.tsv \
            --targets query,value --rank 8 --alpha 16 --lr 2e-3 --batch-size 32 --max-length 64 --epochs 1 --eval-every 500 ;;
    conll) run conll --model minilm --task ner --data $DATA/conll2003/train.txt --eval-data $DATA/conll2003/dev.txt \
            --targets query,value --rank 8 --alpha 16 --lr 2e-3 --batch-size 16 --max-length 128 --epochs 2 --eval-every 500 ;;
    e2e) run e2e --model smollm2-135m --task causal-lm --data $DATA/e2e/train.txt --eval-data $DATA/e2e/test.txt \
            --targets q_proj,v_proj --rank 8 --alpha 16 --lr 1e-3 --batch-size 8 --max-train-examples 960 \
            --max-length 128 --eval-generate 500 --eval-loss-examples 500 --eval-batch-size 16 --max-new-tokens 64 ;;
    *) echo "unknown experiment $what (sst2, conll, e2e)"; exit 2 ;;
  esac
done
