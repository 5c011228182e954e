"""openai_compat plugin."""
