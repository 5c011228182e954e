"""Placeholder until the radix_tree plugin lands."""
