"""DynASyn: multi-subject personalization from one image (Choi, Park, Baek, AAAI-25).

The library works on diffusers / transformers modules and imports nothing from ComfyUI,
so it runs (and is tested) standalone. ComfyUI glue lives in the pack's ``nodes/`` package.
"""

__version__ = "0.1.0"
