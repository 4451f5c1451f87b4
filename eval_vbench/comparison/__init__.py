"""`videocache compare`: the runner that plans and drives the comparison (compare), the spawned process that
generates and measures every run (worker), the on-disk records that make it resumable (run_store), and the
report built from them (report).
"""
