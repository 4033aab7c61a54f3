"""lm-evaluation-harness tasks on lorakit's demo data, for scoring adapters offline through
`lorakit serve` (lm-eval's `local-completions` model) or any other lm-eval model.

    python -m lorakit.data.lm_eval_tasks DIR [--limit N]
    lm_eval --model local-completions --include_path DIR --tasks lorakit_demo_mc,lorakit_demo_gen \\
        --model_args model=ADAPTER,base_url=http://127.0.0.1:8000/v1/completions

writes DIR/lorakit_demo_mc.yaml (multiple choice: the loglikelihood of " negative" and
" positive" after a review), DIR/lorakit_demo_gen.yaml (generate_until: the word the model
writes, exact match) and DIR/lorakit_demo.jsonl, the first N reviews of demo/dev.jsonl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEV = Path(__file__).resolve().parent / "demo" / "dev.jsonl"
LABELS = ["negative", "positive"]
PROMPT = "Review: {{text}}\\nSentiment:"


def write_tasks(directory: str | Path, limit: int = 100) -> list[str]:
    """The two task YAMLs and their data in `directory`; returns the task names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "lorakit_demo.jsonl"
    rows = [json.loads(line) for line in DEV.read_text().splitlines()[:limit]]
    data.write_text("".join(json.dumps({**r, "answer": LABELS.index(r["label"])}) + "\n" for r in rows))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{PROMPT}"
"""
    (directory / "lorakit_demo_mc.yaml").write_text(f"""task: lorakit_demo_mc
{common}output_type: multiple_choice
doc_to_choice: {json.dumps(LABELS)}
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (directory / "lorakit_demo_gen.yaml").write_text(f"""task: lorakit_demo_gen
{common}output_type: generate_until
doc_to_target: "{{{{label}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 4
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: ['\\s']
""")
    return ["lorakit_demo_mc", "lorakit_demo_gen"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--limit", type=int, default=100, help="reviews from demo/dev.jsonl (400 in all)")
    args = parser.parse_args()
    print(" ".join(write_tasks(args.directory, args.limit)))


if __name__ == "__main__":
    main()
