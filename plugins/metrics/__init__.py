"""metrics plugin."""
