"""`hetegen serve`: an OpenAI-compatible HTTP server over one loaded model (plain or through
the heterogeneous engine). The options, the request schemas and error shape, stop strings,
the one-at-a-time generation worker with its bounded queue, Prometheus metrics, the ASGI app
and the server process (docs/serve.md).

May import: `core`, `models`, `profile`, `plan`, `engine`, `run`.
"""
