import torch

from dynasyn.plots import loss_curve_image
from dynasyn.train import StepLog


def test_loss_curve_is_a_comfy_image_with_drawn_lines():
    hist = [StepLog(i, 1, 1.0 / i, {"md": 0.5 / i, "m2a": 0.1}, 1e-3, ["<asset0>"]) for i in range(1, 30)]
    img = loss_curve_image(hist)
    assert img.shape == (1, 360, 640, 3) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    background = torch.tensor([24, 24, 28]) / 255
    assert ((img[0] - background).abs().sum(-1) > 0.1).float().mean() > 0.005  # not blank
    assert loss_curve_image([]).shape == (1, 360, 640, 3)
