"""Evaluation around the engine, one subpackage per concern: `scoring` (VBench and `videocache eval`),
`comparison` (`videocache compare`), `peers` (other libraries' caches as comparison methods), `metrics`
(fidelity, FLOPs, prompt accuracy, cache memory) and `calibration` (the runs behind `videocache profile`).
"""
