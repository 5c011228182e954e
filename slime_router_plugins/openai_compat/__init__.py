"""openai_compat plugin: OpenAI-compatible chat/completions routes over SGLang workers (see README.md)."""
