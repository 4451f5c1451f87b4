"""The stages of scripts/train_reference.py, one module each (clips, vae, decoder, latents, transformer,
assemble), and what each --architecture changes in them (architectures.py), so that the stages need no
per-architecture branches."""
