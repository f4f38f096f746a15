"""Write the built-in sample datasets and synthesis input files: ``python -m genpi.tasks.make_samples``.

Samples (``samples/<task>.jsonl``, 96 records) come from the ``train`` slots; input files
(``inputs/<task>.txt``, 64 inputs separated by ``---`` lines) from the ``heldout`` slots.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from genpi.tasks.base import TASK_NAMES
from genpi.tasks.generators import generate_examples
from genpi.tasks.transcript import load_prompt_file, render_transcript

HERE = Path(__file__).parent


def main() -> None:
    for task in TASK_NAMES:
        context = render_transcript(load_prompt_file(HERE / "prompts" / f"{task}.txt"))
        context_id = hashlib.sha256(context.encode()).hexdigest()[:16]
        records = generate_examples(task, 96, seed=0, split="train")
        (HERE / "samples").mkdir(exist_ok=True)
        with (HERE / "samples" / f"{task}.jsonl").open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({**r, "context_id": context_id, "context": context}, ensure_ascii=False) + "\n")
        inputs = [r["pseudo_input"] for r in generate_examples(task, 64, seed=0, split="heldout")]
        (HERE / "inputs").mkdir(exist_ok=True)
        (HERE / "inputs" / f"{task}.txt").write_text("\n---\n".join(inputs) + "\n", encoding="utf-8")
        print(f"{task}: {len(records)} sample records, {len(inputs)} inputs")


if __name__ == "__main__":
    main()
