"""Write a checkpoint with deliberately changed weights through the pack's exporter (a subprocess).

Usage: python -m tests.support.make_changed_checkpoint FAMILY OUT_DIR NAME EXPECTED_JSON [--diffusers DIR]

Loads the random FAMILY checkpoint with ComfyUI's loader, bridges it to diffusers, changes some
UNet and text-encoder weights, bridges back (patched clone) and saves with the exporter. Writes
the sha256 of each changed/unchanged tensor as ComfyUI stores it to EXPECTED_JSON. With
--diffusers it also saves the changed components (plus a placeholder token) as a diffusers folder.
Runs in its own process so the memory is returned before a server loads the file.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.comfy_env import load_pack, setup_comfy  # noqa: E402
from tests.support.sd_fixtures import random_checkpoint  # noqa: E402


def digest(t):
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def main(family, out_dir, name, expected_json, diffusers_dir=None):
    setup_comfy()
    pack = load_pack()
    import comfy.sd

    bridge = pack.nodes.bridge
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(random_checkpoint(family)), output_vae=True, output_clip=True)
    comps = bridge.native_to_components(model, clip, vae)
    g = torch.Generator().manual_seed(11)
    changed_unet = ["conv_in.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight",
                    "up_blocks.3.resnets.2.conv2.bias"]
    te_params = dict(comps.text_encoder.named_parameters())
    changed_te = [next(k for k in te_params if k.endswith(s)) for s in
                  ("encoder.layers.3.self_attn.q_proj.weight", "final_layer_norm.bias")]
    with torch.no_grad():
        for k in changed_unet:
            p = comps.unet.get_parameter(k)
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for k in changed_te:
            te_params[k].add_(torch.randn(te_params[k].shape, generator=g) * 0.1)
    umap = bridge.unet_key_map(model)
    tmap = bridge.te_key_map(clip, comps.text_encoder)
    clip_sd = clip.cond_stage_model.state_dict()
    unet_sd, te_sd = comps.unet.state_dict(), comps.text_encoder.state_dict()
    expected = {}
    for k in changed_unet + ["mid_block.resnets.0.conv1.weight"]:  # the last one is unchanged
        expected["model.diffusion_model." + umap[k]] = digest(unet_sd[k])
    for k in changed_te:
        ck = tmap[k]
        expected["clip." + ck] = digest(te_sd[k].to(clip_sd[ck].dtype))  # as ComfyUI stores the CLIP
    if diffusers_dir is None:
        m, c = bridge.components_to_native(model, clip, comps)
        bridge.save_checkpoint(out_dir, name, m, c, vae, metadata={"test": "changed weights"})
    else:
        comps.tokenizer.add_tokens(["<asset0>"])
        comps.text_encoder.resize_token_embeddings(len(comps.tokenizer))
        with torch.no_grad():
            comps.text_encoder.get_input_embeddings().weight[-1] = torch.randn(comps.embedding_dim, generator=g) * 0.01
        if family == "sd21v":
            # Zero the norm bias ComfyUI's v-prediction heuristic reads: the loader must keep
            # v-prediction from the scheduler config, not from that guess.
            with torch.no_grad():
                comps.unet.up_blocks[3].attentions[2].transformer_blocks[0].norm1.bias.zero_()
            expected["model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"] = digest(
                comps.unet.up_blocks[3].attentions[2].transformer_blocks[0].norm1.bias)
        from tests.support.comfy_env import ROOT  # noqa: F401
        pack.dynasyn.models.save_components(comps, Path(diffusers_dir))
        expected["placeholder"] = comps.text_encoder.get_input_embeddings().weight[-1].tolist()
        # The loader's CLIP is built fresh by ComfyUI: digests of the text encoder in its storage dtype.
    Path(expected_json).write_text(json.dumps(expected))


if __name__ == "__main__":
    args = sys.argv[1:]
    d = None
    if "--diffusers" in args:
        i = args.index("--diffusers")
        d = args[i + 1]
        args = args[:i] + args[i + 2:]
    main(*args, diffusers_dir=d)
