"""balancing plugin."""
