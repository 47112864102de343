"""functional layer."""
