"""`ftjax serve`: an OpenAI-compatible HTTP server over `ftjax.LLMEngine`.

Modules, one concern each: `protocol` (request bodies, limits, SamplingParams),
`runner` (the engine loop on its own thread), `scoring` (prompt log-probs for echo),
`text` (detokenizing, log-prob shapes, chat templates), `metrics` (Prometheus),
`app` (the FastAPI routes and error handling), `main` (the CLI entry: load, run uvicorn).
Needs the `serve` extra (fastapi, uvicorn, prometheus_client).
"""
