"""The GPU code paths, checked on a CPU: device placement, precision, checkpointing, syncs, memory.

No GPU is needed: device mixing is caught by running the step on the ``meta`` device (any tensor left
on the CPU meets a meta tensor and torch refuses, exactly as it refuses a CPU tensor meeting a CUDA one).
"""

import pytest
import torch

from dynasyn.dataset import AugmentedPair
from dynasyn.tiny import tiny_components
from dynasyn.train import MODES, DynASynTrainer, TrainConfig
from tests.support.scene import tensor_scene as scene


class Reached(Exception):
    """Raised with the loss once the step has computed it (nothing after it can run on ``meta``)."""


def aug_pairs(n=1):
    out = []
    for k in range(n):
        img, masks, _ = scene(seed=10 + k)
        out.append(AugmentedPair(img, "a panda jumping into a bowl", [0, 1], torch.stack(masks)))
    return out


def step_until_loss(t: DynASynTrainer) -> torch.Tensor:
    def stop(value):
        raise Reached(value)

    t.dist.mean = stop  # the step's first use of the loss, after every term is computed
    with pytest.raises(Reached) as hit:
        t.training_step()
    return hit.value.args[0]


def meta_trainer(mode, **kw):
    image, masks, nouns = scene()
    config = TrainConfig(mode=mode, phase1_steps=1, phase2_steps=1, resolution=64, **kw)
    return DynASynTrainer(tiny_components(seed=0), image, masks, nouns, config, augmented=aug_pairs(), device="meta",
                          log=lambda *_: None)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_tensor_of_the_step_is_on_the_trainers_device(mode):
    """The trainable and frozen models live on ``meta``: a tensor left on the CPU (reference masks, noise,
    pseudo-masks, cached encodings, timesteps) makes torch refuse the op, as CUDA would at step 1."""
    t = meta_trainer(mode)
    for phase in MODES[mode][1]:
        t._setup_phase(phase)
        loss = step_until_loss(t)
        assert loss.device.type == "meta"
    assert t.ref_masks.device.type == "meta"
