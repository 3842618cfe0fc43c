"""Passes: pure functions on the IR (see each module docstring for what it requires and guarantees)."""
