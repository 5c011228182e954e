"""radix_tree plugin."""
