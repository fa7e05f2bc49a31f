"""OpenAI wire schemas. Pydantic only: no torch, no engine internals beyond `app.engine.types`."""
