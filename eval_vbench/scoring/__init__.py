"""VBench scoring and `videocache eval`: the command (eval), the prompt suite (vbench_suite), VBench's own
aggregation of dimension scores (vbench_score), and the separate environment that runs the real `vbench`
package (vbench_env, with vbench_runner.py run there as a script).
"""
