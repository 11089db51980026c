"""Runnable examples: ``sagas run examples.NAME:app``."""
