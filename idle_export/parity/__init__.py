"""parity stage."""
