"""How GenPI data is made from a prompt alone: one function per stage (:mod:`.stages`), a plan checked before
any model loads (:mod:`.plan`), role swapping (:mod:`.roleswap`), a store that resumes (:mod:`.store`), the
data card (:mod:`.card`), and clients for hf / vllm / openai (:mod:`.clients`).

The entry point is :func:`genpi.synth.run_synthesis` (``genpi-synth`` on the command line).
"""
