"""The calibration runs behind `videocache profile` (runs): attention profiling, per-budget table search and
the measured ablation that picks a profile's presets.
"""
