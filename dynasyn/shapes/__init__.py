"""Shapes World: a procedural world, its scorer and a small pretrained SD-shaped model (no ComfyUI imports)."""
