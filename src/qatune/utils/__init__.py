"""Helpers every layer may use: atomic file writes, directory locks, YAML with one-line errors, the machine
description, console output, and the crash-test hook (`faults.py`, inert unless `QATUNE_FAULT_AT` is set)."""
