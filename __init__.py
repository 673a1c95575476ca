"""ComfyUI-DynASyn: teach Stable Diffusion several subjects from ONE picture (DynASyn, AAAI-25).

@title: ComfyUI-DynASyn
@description: Multi-subject personalization from a single image: subject masks, augmentation
              (VLM, LLM, SAM, compose + inpaint, Guided SDE Augmentation) and full training.
"""

from .nodes._registry import load_node_classes

# Each node module is imported on its own: a missing optional dependency disables only the
# nodes of that module (one log line says what to install); the rest of the pack loads.
_CLASSES = load_node_classes(__name__ + ".nodes", {
    "loaders": ("DynASynDiffusersLoader",),
    "export_nodes": ("DynASynSaveCheckpoint", "DynASynSaveLoRA"),
    "train_node": ("DynASynTrain", "DynASynScenePrompt", "DynASynLoadRun", "DynASynContinueTraining"),
    "tiny_node": ("DynASynTinyModel",),
    "shapes_node": ("DynASynShapesWorldModel",),
    "mask_nodes": ("DynASynMaskBatch",),
    "example_node": ("DynASynExampleScene",),
    "sam_nodes": ("DynASynSAMLoader", "DynASynSAMMasks"),
    "gsa_node": ("DynASynGSA",),
    "grounding_node": ("DynASynDetectorLoader",),
    "augment_nodes": ("DynASynLLMSettings", "DynASynDescribeSubjects", "DynASynAugmentPrompts", "DynASynAugment",
                      "DynASynDrafts", "DynASynCompose", "DynASynMakePair", "DynASynSaveDataset", "DynASynLoadDataset"),
})

# Literal mapping (ComfyUI-Manager reads the keys statically); unavailable nodes are dropped below.
NODE_CLASS_MAPPINGS = {
    "DynASynDiffusersLoader": _CLASSES.get("DynASynDiffusersLoader"),
    "DynASynSaveCheckpoint": _CLASSES.get("DynASynSaveCheckpoint"),
    "DynASynSaveLoRA": _CLASSES.get("DynASynSaveLoRA"),
    "DynASynTrain": _CLASSES.get("DynASynTrain"),
    "DynASynScenePrompt": _CLASSES.get("DynASynScenePrompt"),
    "DynASynLoadRun": _CLASSES.get("DynASynLoadRun"),
    "DynASynContinueTraining": _CLASSES.get("DynASynContinueTraining"),
    "DynASynTinyModel": _CLASSES.get("DynASynTinyModel"),
    "DynASynShapesWorldModel": _CLASSES.get("DynASynShapesWorldModel"),
    "DynASynMaskBatch": _CLASSES.get("DynASynMaskBatch"),
    "DynASynExampleScene": _CLASSES.get("DynASynExampleScene"),
    "DynASynSAMLoader": _CLASSES.get("DynASynSAMLoader"),
    "DynASynSAMMasks": _CLASSES.get("DynASynSAMMasks"),
    "DynASynLLMSettings": _CLASSES.get("DynASynLLMSettings"),
    "DynASynDescribeSubjects": _CLASSES.get("DynASynDescribeSubjects"),
    "DynASynAugmentPrompts": _CLASSES.get("DynASynAugmentPrompts"),
    "DynASynAugment": _CLASSES.get("DynASynAugment"),
    "DynASynDrafts": _CLASSES.get("DynASynDrafts"),
    "DynASynCompose": _CLASSES.get("DynASynCompose"),
    "DynASynMakePair": _CLASSES.get("DynASynMakePair"),
    "DynASynGSA": _CLASSES.get("DynASynGSA"),
    "DynASynDetectorLoader": _CLASSES.get("DynASynDetectorLoader"),
    "DynASynSaveDataset": _CLASSES.get("DynASynSaveDataset"),
    "DynASynLoadDataset": _CLASSES.get("DynASynLoadDataset"),
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DynASynDiffusersLoader": "DynASyn Load Diffusers Model",
    "DynASynSaveCheckpoint": "DynASyn Save Checkpoint",
    "DynASynSaveLoRA": "DynASyn Save LoRA",
    "DynASynTrain": "DynASyn Train",
    "DynASynScenePrompt": "DynASyn Scene Prompt",
    "DynASynLoadRun": "DynASyn Load Run",
    "DynASynContinueTraining": "DynASyn Continue Training",
    "DynASynTinyModel": "DynASyn Tiny Model (built-in, for tests and demos)",
    "DynASynShapesWorldModel": "DynASyn Shapes World Model",
    "DynASynMaskBatch": "DynASyn Subject Masks",
    "DynASynExampleScene": "DynASyn Example Scene",
    "DynASynSAMLoader": "DynASyn SAM Loader",
    "DynASynSAMMasks": "DynASyn SAM Masks",
    "DynASynLLMSettings": "DynASyn LLM Settings",
    "DynASynDescribeSubjects": "DynASyn Describe Subjects (VLM / offline)",
    "DynASynAugmentPrompts": "DynASyn Augment Prompts (LLM / offline)",
    "DynASynAugment": "DynASyn Augment (drafts, compose, inpaint, GSA)",
    "DynASynDrafts": "DynASyn Drafts",
    "DynASynCompose": "DynASyn Compose",
    "DynASynMakePair": "DynASyn Make Pair",
    "DynASynGSA": "DynASyn Guided SDE Augmentation",
    "DynASynDetectorLoader": "DynASyn Detector Loader (optional, for Augment)",
    "DynASynSaveDataset": "DynASyn Save Dataset",
    "DynASynLoadDataset": "DynASyn Load Dataset",
}
NODE_CLASS_MAPPINGS = {k: v for k, v in NODE_CLASS_MAPPINGS.items() if v is not None}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for k, v in NODE_DISPLAY_NAME_MAPPINGS.items() if k in NODE_CLASS_MAPPINGS}

WEB_DIRECTORY = "./web"


def _register_routes() -> None:
    """The page's LLM model list (nodes/routes.py); without it only that list is missing."""
    try:
        from .nodes.routes import register_routes

        register_routes()
    except Exception:  # noqa: BLE001
        import logging

        logging.getLogger("DynASyn").exception("[DynASyn] the LLM model list route could not be added")


_register_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
