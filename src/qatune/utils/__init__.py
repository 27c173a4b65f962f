"""Helpers every layer may use: atomic file writes, the machine description, console output."""
