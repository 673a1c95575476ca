import random

import pytest
import torch

from dynasyn.losses import (all_nonempty_subsets, augmentation_loss, inter_cross_attention_loss, masked_attention_loss,
                            masked_diffusion_loss, normalize_max, union_mask, union_sample)


def test_normalize_max_gives_peak_one_per_map():
    x = torch.rand(3, 16, 16) * torch.tensor([0.01, 2.0, 50.0])[:, None, None]
    g = normalize_max(x)
    torch.testing.assert_close(g.flatten(1).amax(1), torch.ones(3))
    torch.testing.assert_close(g * x.flatten(1).amax(1)[:, None, None], x)


def test_masked_diffusion_loss_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # masked: pred*m = [1,0,0,4], target*m = [0,0,0,1] -> squared errors 1,0,0,9 -> mean 2.5
    assert masked_diffusion_loss(pred, target, mask).item() == pytest.approx(2.5)
    big_mask = mask.repeat_interleave(4, 0).repeat_interleave(4, 1)  # 8x8 pixel mask, nearest-resized
    assert masked_diffusion_loss(pred, target, big_mask).item() == pytest.approx(2.5)


def test_masked_attention_loss_by_hand():
    a = torch.tensor([[[0.5, 0.25], [0.0, 0.25]]])  # max 0.5 -> normalized [1, .5, 0, .5]
    m = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # errors (1-1)^2, (.5-1)^2, 0, (.5-0)^2 -> mean 0.125
    assert masked_attention_loss(a, m).item() == pytest.approx(0.125)
    two = masked_attention_loss(torch.cat([a, a]), torch.cat([m, m]))
    assert two.item() == pytest.approx(0.25)  # summed over subjects
    assert masked_attention_loss(a, m, normalize=False).item() == pytest.approx((0.25 + 0.5625 + 0 + 0.0625) / 4)


def test_inter_cross_attention_loss_by_hand_and_stop_gradient():
    a = torch.tensor([[[0.2, 0.1], [0.1, 0.0]]], requires_grad=True)  # normalized [1, .5, .5, 0]
    cls = torch.tensor([[[0.4, 0.8], [0.2, 0.6]]], requires_grad=True)
    m = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    # target g(m*cls) = [.4,.8,.2,0]/.8 = [.5, 1, .25, 0]; errors .25, .25, .0625, 0 -> mean .140625
    loss = inter_cross_attention_loss(a, cls, m)
    assert loss.item() == pytest.approx(0.140625)
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert cls.grad is None  # the frozen model's maps are a fixed target


def test_augmentation_loss_is_the_ica_form_on_pseudo_masks():
    a, cls, m = torch.rand(2, 16, 16), torch.rand(2, 16, 16), (torch.rand(2, 64, 64) > 0.5).float()
    assert augmentation_loss(a, cls, m).item() == pytest.approx(inter_cross_attention_loss(a, cls, m).item())


def test_union_sampling_reaches_every_nonempty_subset():
    rng = random.Random(0)
    for n in (1, 2, 3, 4):
        seen = {frozenset(union_sample(n, rng)) for _ in range(2000)}
        assert seen == set(all_nonempty_subsets(n))


def test_union_mask_is_pixelwise_max():
    masks = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]])
    assert union_mask(masks, [0, 1]).tolist() == [[1.0, 1.0]]
    assert union_mask(masks, [2]).tolist() == [[0.0, 0.0]]


def test_inter_cross_attention_target_is_g_of_masked_class_map_with_the_peak_outside_the_mask():
    """g(M ⊙ A) rescales what is left inside the mask to peak 1; M ⊙ g(A) would keep the outside peak's scale."""
    cls = torch.tensor([[[0.4, 0.2], [0.2, 0.9]]])
    m = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])          # the class map's peak (.9) is outside the mask
    good = torch.tensor([[[1.0, 0.5], [0.5, 0.0]]])       # = g(M ⊙ A) = [1, .5, .5, 0]
    wrong = torch.tensor([[[0.4, 0.2], [0.2, 0.0]]]) / 0.9  # = M ⊙ g(A) = [.44, .22, .22, 0]
    assert inter_cross_attention_loss(good, cls, m).item() == pytest.approx(0.0, abs=1e-12)
    # the placeholder side is max-normalised too, so compare un-normalised to see the target itself
    assert inter_cross_attention_loss(good, cls, m, normalize=False).item() == pytest.approx(0.0, abs=1e-12)
    err = ((wrong - good) ** 2).mean().item()
    assert inter_cross_attention_loss(wrong, cls, m, normalize=False).item() == pytest.approx(err)
    assert err > 0.05
