"""Placeholder until the balancing plugin lands."""
