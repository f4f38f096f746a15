"""Evaluation: how close the student (base + adapter, no prompt) comes to the teacher (base + prompt),
measured against the floor (base, no prompt); what dropping the prompt saves; the report.

- :mod:`genpi.evaluation.metrics`: KL per example, agreement (exact match, token F1, ROUGE-L), gap closed;
- :mod:`genpi.evaluation.generation`: greedy generation and timing through vLLM (a worker process) or transformers;
- :mod:`genpi.evaluation.savings`: tokens, prefill FLOPs and measured latency with and without the prompt;
- :mod:`genpi.evaluation.artifacts`: finding the run and its adapter, refusing mismatched or overlapping input;
- :mod:`genpi.evaluation.report`: ``metrics.json``, ``report.md`` and the plots.
"""
