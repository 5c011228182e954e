"""Placeholder until the metrics plugin lands."""
