"""Synthetic defect generation: procedural (Perlin masks + texture transplant) and learned (diffusion)."""
