"""Ray Serve: the base model with multiplexed adapters, merged models, and the OpenAI-compatible API.

Entry point: `serve.app:build_app(ServeSpec)`; the spec is `serve.spec.ServeSpec`.
"""
