"""The trainer's Adafactor: transformers' update, with each tensor's two largest dimensions factored."""

import pytest
import torch
from transformers.optimization import Adafactor

from dynasyn.errors import DynASynError
from dynasyn.memory import _adafactor_elements
from dynasyn.optim import FusedBackwardOptimizer, factor_dims, factored_adafactor
from dynasyn.train import TrainConfig


def _reference_step(weight, grads, lr, weight_decay):
    """transformers' Adafactor on a contiguous copy with the two largest dimensions moved last."""
    dims = factor_dims(weight.shape)
    ref = torch.nn.Parameter(weight.detach().permute(dims).contiguous().clone())
    opt = Adafactor([ref], lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                    weight_decay=weight_decay)
    for g in grads:
        ref.grad = g.permute(dims).contiguous()
        opt.step()
    inverse = [dims.index(d) for d in range(len(dims))]
    return ref.detach().permute(inverse), opt


def test_factor_dims_puts_the_two_largest_last():
    assert factor_dims((320, 4, 3, 3)) == (2, 3, 0, 1)
    assert factor_dims((1280, 1280, 1, 1)) == (2, 3, 0, 1)
    assert factor_dims((77, 768)) == (0, 1) and factor_dims((5,)) == (0,)
    assert factor_dims((3, 640, 3, 320)) == (0, 2, 1, 3)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (32, 24, 1, 1), (12, 20), (7,)])
def test_updates_equal_transformers_adafactor_on_the_factored_layout(shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    start = w.detach().clone()
    grads = [torch.randn(shape) for _ in range(3)]
    expected, ref_opt = _reference_step(w, grads, lr=1e-2, weight_decay=1e-2)
    opt = factored_adafactor([w], lr=1e-2, weight_decay=1e-2)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    # the views share storage: the update lands in the trained tensor (equal up to the order of the means'
    # sums over strided memory)
    assert (w.detach() - start).abs().max() > 1e-3  # it moved
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-7)
    st, ref_st = opt.state[w], ref_opt.state[ref_opt.param_groups[0]["params"][0]]
    for k in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
        assert (k in st) == (k in ref_st)
        if k in st:
            torch.testing.assert_close(st[k], ref_st[k], rtol=1e-6, atol=0)


def test_a_convolutions_statistics_are_tiny_where_transformers_keeps_two_thirds_of_it():
    conv = torch.nn.Parameter(torch.randn(320, 640, 3, 3))
    conv.grad = torch.randn_like(conv)
    opt = factored_adafactor([conv], lr=1e-3)
    opt.step()
    held = sum(v.numel() for v in opt.state[conv].values() if torch.is_tensor(v) and v.dim())
    assert held == 9 * 320 + 9 * 640 == _adafactor_elements([conv])
    stock = Adafactor([torch.nn.Parameter(conv.detach().clone())], lr=1e-3, scale_parameter=False,
                      relative_step=False, warmup_init=False)
    stock.param_groups[0]["params"][0].grad = conv.grad.clone()
    stock.step()
    stock_held = sum(v.numel() for v in next(iter(stock.state.values())).values() if torch.is_tensor(v) and v.dim())
    assert stock_held == 2 * 320 * 640 * 3 > 100 * held


def test_state_round_trips_and_an_old_layout_is_refused_clearly():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    w.grad = torch.randn_like(w)
    opt = factored_adafactor([w], lr=1e-2)
    opt.step()
    saved = opt.state_dict()
    again = factored_adafactor([w], lr=1e-2)
    again.load_state_dict(saved)
    assert torch.equal(again.state[w]["exp_avg_sq_row"], opt.state[w]["exp_avg_sq_row"])
    old = {"state": {0: {"step": 1, "exp_avg_sq_row": torch.zeros(8, 4, 3), "exp_avg_sq_col": torch.zeros(8, 4, 3),
                         "RMS": torch.tensor(1.0)}}, "param_groups": saved["param_groups"]}
    with pytest.raises(DynASynError, match="older version.*resume off"):
        factored_adafactor([w], lr=1e-2).load_state_dict(old)


def test_fused_backward_skip_restores_the_factored_state():
    """A non-finite gradient: the fused step's rollback finds the state under the view it is kept by."""
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    opt = FusedBackwardOptimizer([w], lr=1e-2, cfg=TrainConfig(optimizer="adafactor"))
    loss = (w * torch.randn_like(w)).sum()
    opt.begin(loss)
    loss.backward()
    key = w
    before_w, before_row = w.detach().clone(), opt.optimizers[0].state[key]["exp_avg_sq_row"].clone()
    assert not opt.found_inf
    bad = (w * float("nan")).sum()
    opt.zero_grad()
    opt.begin(bad)
    bad.backward()
    assert opt.found_inf
    assert torch.equal(w.detach(), before_w)
    assert torch.equal(opt.optimizers[0].state[key]["exp_avg_sq_row"], before_row)
    opt.remove()


def test_zero_grad_clears_the_trained_tensors_gradients():
    """The trainer's zero_grad between steps: without it, gradients would add up across steps."""
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    opt = factored_adafactor([w], lr=1e-2)
    (w * 2).sum().backward()
    opt.step()
    opt.zero_grad()
    assert w.grad is None
    (w * 2).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_the_grad_scaler_unscales_what_adafactor_steps():
    """fp16 training: GradScaler.unscale_ walks the optimizer's tensors, so they must be the trained ones."""
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    ref = torch.nn.Parameter(w.detach().clone())
    opt, ref_opt = factored_adafactor([w], lr=1e-2), factored_adafactor([ref], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((w ** 2).sum()).backward()
    scaler.unscale_(opt)
    torch.testing.assert_close(w.grad, 2 * w.detach())
    scaler.step(opt)
    scaler.update()  # raised "No inf checks were recorded" when the optimizer held views
    (ref ** 2).sum().backward()
    ref_opt.step()
    torch.testing.assert_close(w.detach(), ref.detach())
