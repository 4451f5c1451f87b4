"""The methods a comparison runs (diffusers' caches, cache-dit, videocache's own engine): spec parsing, and
how each method is switched on and off a pipeline (spec).
"""
