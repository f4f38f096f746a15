"""The built-in messages of the generator (pseudo inputs) and of the reasoner (reasons).

Both can be replaced from config: ``synth.pseudo_inputs.template`` (fields ``{prompt}``, ``{examples}``,
``{k}``) and ``synth.reasons.template`` (fields ``{prompt}``, ``{input}``, ``{student}``, ``{teacher}``).
"""

PSEUDO_INPUT_TEMPLATE = """You write test inputs for an AI agent. This is the agent's prompt:

<prompt>
{prompt}
</prompt>

Inputs the agent has received:
{examples}

Write {k} new inputs for this agent, different from these and from each other, as a numbered list \
(1. ..., 2. ...): one input per item, nothing else."""

REASON_TEMPLATE = """An AI agent answered the same input twice: once without its instruction prompt and once with it.

### The prompt
{prompt}

### The input
{input}

### Answer without the prompt (bad)
{student}

### Answer with the prompt (good)
{teacher}

In a few sentences, explain why the prompt changes the answer: what in the prompt makes the good answer good."""
