"""ComfyUI nodes of the pack: thin wrappers over ``dynasyn``; the only code that imports ComfyUI."""
