"""Adapter checkpoints: key mapping (`keys`), files and the Hub (`io`)."""
