"""Test-only nodes, loaded into the test server next to the pack: they report weight digests."""

import hashlib
import json

import torch


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class DynASynTestWeightDigest:
    CATEGORY = "DynASyn/testing"
    FUNCTION = "digest"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "keys": ("STRING", {"default": "[]"})},
                "optional": {"text": ("STRING", {"forceInput": True})}}

    def digest(self, model, clip, keys, text=None):
        import comfy.model_sampling

        state = {**{"model." + k: v for k, v in model.model.state_dict().items()},
                 **{"clip." + k: v for k, v in clip.cond_stage_model.state_dict().items()}}
        out = {k: _digest(state[k]) if k in state else None for k in json.loads(keys)}
        sampling = model.get_model_object("model_sampling")
        out["prediction"] = "v_prediction" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "epsilon"
        out["text"] = text
        return {"ui": {"text": [json.dumps(out)]}}


NODE_CLASS_MAPPINGS = {"DynASynTestWeightDigest": DynASynTestWeightDigest}
