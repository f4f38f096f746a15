"""Where agents act: an episode runner (reset, step, judge), sandboxes for their commands, AgentBench's OS
Interaction problems read from a user's checkout, and genpi's own OS problems.

- :mod:`~genpi.environments.problems`: AgentBench's problem format, read as it is;
- :mod:`~genpi.environments.protocol`: the text protocol (``Act:`` parsing, user turns, output truncation);
- :mod:`~genpi.environments.episode`: one episode and the judge;
- :mod:`~genpi.environments.agents`: teacher / student / floor views and the policies that reply;
- :mod:`~genpi.environments.runner`: lockstep batching of many episodes;
- :mod:`~genpi.environments.results`: success rates, endings, per-label breakdown, ``episodes.jsonl``;
- :mod:`~genpi.environments.evaluate`: the environment evaluation ``genpi-eval eval.env.enabled=true`` runs;
- :mod:`~genpi.environments.genpi_os`: genpi's own OS problems in AgentBench's format;
- :mod:`~genpi.environments.sandbox`: the machines (``local`` namespaces, ``docker``).
"""
