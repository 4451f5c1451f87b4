"""What a comparison measures besides time: PSNR / SSIM against the uncached video (fidelity), executed block
FLOPs (flops), the offline prompt accuracy of reference-pipeline videos (prompt_accuracy), and the bytes a
third-party cache keeps alive (cache_memory).
"""
