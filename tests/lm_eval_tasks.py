"""Local lm-evaluation-harness tasks for tests: YAML + jsonl written to a directory.

Four tasks over a few lines of Python-like text (what the bundled tokenizer knows),
one per request type the ftjax backend implements:
  ftjax_ll   loglikelihood (a LAMBADA-style last word: perplexity, acc)
  ftjax_mc   multiple choice (acc, acc_norm over 4 choices)
  ftjax_ppl  loglikelihood_rolling (word / byte perplexity, bits per byte)
  ftjax_gen  generate_until (stop at a newline, 12 tokens at most)
No hub: the data is `json` files read by the `datasets` json builder.
"""

import json
import os

LINES = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i)",
    "import os\npath = os.path.join(root, name)",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x",
    "if value is None:\n    raise ValueError('missing value')",
    "with open(filename) as f:\n    data = f.read()",
    "result = [x * x for x in numbers if x > 0]",
    "try:\n    import numpy as np\nexcept ImportError:\n    np = None",
]

CHOICES = ["return", "print", "import", "class"]

TASKS = {
    "ftjax_ll": """
task: ftjax_ll
dataset_path: json
dataset_kwargs: {data_files: {test: DATA/ll.jsonl}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "ftjax_mc": """
task: ftjax_mc
dataset_path: json
dataset_kwargs: {data_files: {test: DATA/mc.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "ftjax_ppl": """
task: ftjax_ppl
dataset_path: json
dataset_kwargs: {data_files: {test: DATA/ppl.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    "ftjax_gen": """
task: ftjax_gen
dataset_path: json
dataset_kwargs: {data_files: {test: DATA/gen.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 12, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
}


def write_tasks(directory: str) -> str:
    """Writes the four task YAMLs and their jsonl data into `directory`; returns it."""
    os.makedirs(directory, exist_ok=True)

    def dump(name, rows):
        with open(os.path.join(directory, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    ll, mc, gen = [], [], []
    for i, text in enumerate(LINES):
        context, _, word = text.rpartition(" ")
        ll.append({"context": context, "target": " " + word})
        mc.append({"context": text.split("\n")[0] + "\n    ", "choices": CHOICES,
                   "label": i % len(CHOICES)})
        gen.append({"context": text.split("\n")[0] + "\n", "target": text.split("\n")[-1]})
    dump("ll.jsonl", ll)
    dump("mc.jsonl", mc)
    # Rolling documents longer than the tiny models' 64 positions: several windows each.
    dump("ppl.jsonl", [{"text": "\n\n".join(LINES[i:] + LINES[:i])} for i in range(3)])
    dump("gen.jsonl", gen)
    for name, text in TASKS.items():
        with open(os.path.join(directory, name + ".yaml"), "w") as f:
            f.write(text.replace("DATA", directory))
    return directory
