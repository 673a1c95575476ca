"""Small helpers shared by the pack's nodes (ComfyUI side)."""

from __future__ import annotations

import torch

from ..dynasyn.errors import DynASynError


def _out_of_memory(e: BaseException | None) -> bool:
    """A device out-of-memory error, itself or as the cause of a library error (e.g. the trainer's OutOfMemory)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
        seen.add(id(e))
        e = e.__cause__
    return False


def user_error(e: Exception) -> RuntimeError:
    """Wrap a library error so ComfyUI shows its message (no deep torch trace needed to understand it).

    Out-of-memory stays torch's OutOfMemoryError (with the message added), so ComfyUI's own OOM handling runs:
    it unloads every model and shows its memory tips."""
    notes = "".join(f" {n}" for n in getattr(e, "__notes__", ()))  # e.g. where the resumable state was saved
    if _out_of_memory(e):
        return torch.cuda.OutOfMemoryError(f"DynASyn: {e}{notes}")
    if isinstance(e, DynASynError):
        return RuntimeError(f"DynASyn: {e}{notes}")
    return RuntimeError(f"DynASyn: {type(e).__name__}: {e}{notes}")


def class_nouns(text: str) -> list[str]:
    """The class nouns of a comma-separated widget ('panda, bowl,' -> ['panda', 'bowl']); none is an error."""
    nouns = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not nouns:
        raise DynASynError("Write the class noun of each subject, comma-separated (e.g. 'panda, bowl').")
    return nouns


def one_image(image: torch.Tensor) -> torch.Tensor:
    """The single reference picture of an IMAGE input, RGB [H, W, 3]; a batch is refused."""
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise DynASynError(f"Expected an IMAGE; got a tensor of shape {tuple(image.shape)}.")
    if image.shape[0] != 1:
        raise DynASynError(f"The reference must be ONE image, not a batch of {image.shape[0]}; pick one with ImageFromBatch.")
    return image[0, ..., :3].float()


def subject_masks(masks: torch.Tensor, n: int, size) -> list[torch.Tensor]:
    """One [H, W] mask per subject from a MASK input, checked against the subject count and image size."""
    masks = masks if masks.ndim == 3 else masks[None]
    if masks.shape[0] != n:
        raise DynASynError(f"{masks.shape[0]} masks for {n} class nouns: give one mask per subject, in the same order.")
    if tuple(masks.shape[-2:]) != tuple(size):
        raise DynASynError(f"The masks ({masks.shape[-1]}x{masks.shape[-2]}) must have the image's size ({size[1]}x{size[0]}).")
    return [m.float() for m in masks]
