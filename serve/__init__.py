"""trace-ray's Ray Serve application (OpenAI-compatible API for the re-aligned model, online
triage). ``serve.app:build_app`` is the builder; see docs/serving.md."""
