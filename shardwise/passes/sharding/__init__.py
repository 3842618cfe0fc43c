"""Sharding: strategies per op from the registry, their redistributions, and the choosers."""
