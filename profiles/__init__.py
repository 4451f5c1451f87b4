"""Shipped cache profiles (YAML), installed as package data `videocache.profiles`.

This folder holds data, not code: pyproject.toml maps it to `videocache.profiles` so that wheels carry
the profiles, and `videocache.profile` finds them with importlib.resources.
"""
