"""Placeholder until the openai_compat plugin lands."""
