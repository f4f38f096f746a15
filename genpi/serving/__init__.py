"""Serving the internalized student: prompt recognition (:mod:`.prompt_match`), the ASGI middleware inside vLLM's
OpenAI-compatible server (:mod:`.middleware`) and the process that plans and runs the server (:mod:`.server`)."""
