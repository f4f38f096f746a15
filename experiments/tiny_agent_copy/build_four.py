"""The four-task tiny_agent of four_task.json (the copying recipe of the probes, for all four tasks, os weighted 4:1),
built by genpi's own builder (never the shipped weights; cached, and resumed after a kill): prints the build's
folder last. python experiments/tiny_agent_copy/build_four.py"""
import json
from pathlib import Path

from genpi.models.tiny_agent import build_tiny_agent

RECIPE = json.loads((Path(__file__).resolve().parent / "four_task.json").read_text())
print(build_tiny_agent({"tiny_agent": RECIPE}, use_shipped=False))
