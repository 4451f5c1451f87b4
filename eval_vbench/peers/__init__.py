"""The methods a comparison runs, one module per library: diffusers' caches (diffusers_caches), cache-dit
(cachedit) and videocache's own engine with a profile's preset (videocache_engine); the spec parsing and the
base classes they share are in spec.
"""
