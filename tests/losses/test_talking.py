"""Talking Models' pure-torch pieces: message coders, loss terms by hand, and the hidden-state substitute utility."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.talking import (
    MessageCoder,
    MessageDecoder,
    MessageEncoder,
    autoencoding_loss,
    interactive_terms,
    message_mse,
    message_variance_loss,
    translation_loss,
)
from kd_lightning.models.substitute import preserved_buffers, run_with_substitute
from kd_lightning.models.taps import UnknownModuleError


# ------------------------------------------------------------------------------------------- coders
def test_coder_shapes_hidden_width_and_message_norm() -> None:
    torch.manual_seed(0)
    coder = MessageCoder((4, 2, 2), message_dim=6)
    h = torch.randn(5, 4, 2, 2)
    m = coder.encode(h)
    assert m.shape == (5, 6) and coder.dim == 16
    assert coder.decode(m).shape == (5, 4, 2, 2) and coder(h).shape == h.shape
    enc, dec = coder.encoder, coder.decoder
    assert [layer.out_features for layer in enc.net if isinstance(layer, nn.Linear)] == [12, 6]  # d -> 2m -> m
    assert [layer.out_features for layer in dec.net if isinstance(layer, nn.Linear)] == [12, 16]  # m -> 2m -> d
    assert isinstance(enc.net[1], nn.GELU) and isinstance(enc.norm, nn.LayerNorm)
    # LayerNorm on the message: zero mean, unit (biased) std per message at initialisation
    torch.testing.assert_close(m.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.var(-1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    plain = MessageEncoder(16, 6, hidden_dim=3, norm=False)
    assert isinstance(plain.norm, nn.Identity) and plain.net[0].out_features == 3
    assert MessageDecoder(6, 16, hidden_dim=5).net[0].out_features == 5


def test_bad_coder_sizes_name_the_argument() -> None:
    with pytest.raises(KDConfigError, match=r"^message_dim: must be an integer >= 1, got 0"):
        MessageEncoder(4, 0)
    with pytest.raises(KDConfigError, match=r"^out_dim: must be an integer >= 1"):
        MessageDecoder(4, 0)


# ------------------------------------------------------------------------------------------- loss terms
def test_message_mse_by_hand() -> None:
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert message_mse(pred, target).item() == pytest.approx((0 + 4 + 9 + 4) / 4)
    with pytest.raises(KDConfigError, match="same shape"):
        message_mse(pred, target[:1])


def test_autoencoding_loss_is_zero_for_an_identity_coder_and_the_mse_otherwise() -> None:
    h = torch.randn(4, 2, 3)
    identity = MessageCoder((2, 3), encoder=nn.Identity(), decoder=nn.Identity())
    assert autoencoding_loss(identity, h).item() == 0.0
    torch.manual_seed(0)
    coder = MessageCoder((2, 3), message_dim=4)
    expected = ((coder.decoder(coder.encoder(h.reshape(4, 6))) - h.reshape(4, 6)) ** 2).mean()
    assert autoencoding_loss(coder, h).item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() > 0


def test_autoencoding_loss_reaches_the_hidden_state_only_when_asked() -> None:
    coder = MessageCoder((3,), message_dim=2)
    h = torch.randn(4, 3, requires_grad=True)
    autoencoding_loss(coder, h).backward()
    assert h.grad is None and coder.encoder.net[0].weight.grad is not None
    autoencoding_loss(coder, h, detach_input=False).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_translation_loss_by_hand_and_its_stop_gradient() -> None:
    decoded = torch.tensor([[1.0, 1.0]], requires_grad=True)
    h_s = torch.tensor([[0.0, 3.0]], requires_grad=True)
    loss = translation_loss(decoded, h_s)
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss.backward()
    assert h_s.grad is None
    torch.testing.assert_close(decoded.grad, torch.tensor([[1.0, -2.0]]))  # 2 (d - h) / N
    translation_loss(decoded, h_s, detach_student=False).backward()
    torch.testing.assert_close(h_s.grad, torch.tensor([[-1.0, 2.0]]))


def test_interactive_terms_by_hand() -> None:
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    z_t = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    tau = 2.0
    terms = interactive_terms(z, y, z_t, tau)
    ce = sum(-math.log(math.exp(z[i, y[i]]) / sum(math.exp(v) for v in z[i])) for i in range(2)) / 2
    kl = 0.0
    for i in range(2):
        p_t = [math.exp(v / tau) for v in z_t[i].tolist()]
        p_s = [math.exp(v / tau) for v in z[i].tolist()]
        p_t, p_s = [v / sum(p_t) for v in p_t], [v / sum(p_s) for v in p_s]
        kl += sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    assert terms["int_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["int_kd"].item() == pytest.approx(tau**2 * kl / 2, rel=1e-5)
    assert interactive_terms(z, y, z.clone(), tau)["int_kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert set(interactive_terms(z, None, z_t)) == {"int_kd"} and set(interactive_terms(z, y, None)) == {"int_ce"}
    with pytest.raises(KDConfigError, match=r"^temperature: must be a finite number > 0"):
        interactive_terms(z, y, z_t, 0.0)


def test_interactive_kd_does_not_train_the_teacher_prediction() -> None:
    z, z_t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    interactive_terms(z, None, z_t)["int_kd"].backward()
    assert z_t.grad is None and z.grad is not None


def test_message_variance_loss_by_hand() -> None:
    m = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # dim 0: unbiased var 2 (std > 1); dim 1: constant
    eps = 1e-4
    expected = (max(0.0, 1 - math.sqrt(2 + eps)) + (1 - math.sqrt(eps))) / 2
    assert message_variance_loss(m, target_std=1.0, eps=eps).item() == pytest.approx(expected, rel=1e-6)
    assert message_variance_loss(torch.randn(512, 4) * 3).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(KDConfigError, match="B >= 2"):
        message_variance_loss(torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------- substitute
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_substitute_replaces_the_hidden_state_of_a_two_layer_mlp() -> None:
    net = mlp()
    x, h = torch.randn(5, 3), torch.randn(5, 4)
    w2, b2 = net[2].weight, net[2].bias
    by_hand = h @ w2.T + b2  # the rest after ReLU's output / the second Linear's input
    torch.testing.assert_close(run_with_substitute(net, "1", x, h), by_hand)
    torch.testing.assert_close(run_with_substitute(net, "2:input", x, h), by_hand)
    torch.testing.assert_close(run_with_substitute(net, "1:output", x, h), by_hand)
    torch.testing.assert_close(run_with_substitute(net, "0", x, h), h.clamp(min=0) @ w2.T + b2)  # ReLU still runs
    assert not torch.allclose(net(x), by_hand)  # the plain forward is different
    assert no_hooks(net)


def test_substitute_gradient_reaches_the_hidden_state_and_not_the_prefix() -> None:
    net = mlp()
    seen: list[bool] = []
    net[0].register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    h = torch.randn(5, 4, requires_grad=True)
    run_with_substitute(net, "1", torch.randn(5, 3), h, grad_from_tap=True).sum().backward()
    torch.testing.assert_close(h.grad, net[2].weight.sum(0).expand(5, 4))
    assert net[0].weight.grad is None and net[2].weight.grad is not None
    run_with_substitute(net, "1", torch.randn(5, 3), h)
    assert seen == [False, True]  # the prefix ran without autograd only with grad_from_tap
    assert torch.is_grad_enabled()


def test_substitute_with_constant_params_trains_only_the_hidden_state() -> None:
    net = mlp()
    h = torch.randn(5, 4, requires_grad=True)
    out = run_with_substitute(net, "2:input", torch.randn(5, 3), h, constant_params=True)
    torch.testing.assert_close(out, h @ net[2].weight.T + net[2].bias)
    out.sum().backward()
    assert all(p.grad is None for p in net.parameters()) and h.grad is not None
    assert all(isinstance(p, nn.Parameter) for p in net.parameters()) and no_hooks(net)


def test_substitute_until_reads_a_later_layer_and_stops_there() -> None:
    net = mlp()
    calls: list[str] = []
    net[2].register_forward_pre_hook(lambda m, a: calls.append("fc2"))
    h = torch.randn(5, 4)
    out = run_with_substitute(net, "0", torch.randn(5, 3), h, until="2:input")
    torch.testing.assert_close(out, h.clamp(min=0))
    assert calls == []  # the forward stopped before the second Linear
    with pytest.raises(KDConfigError, match="runs before"):
        run_with_substitute(net, "2:input", torch.randn(5, 3), h, until="0")
    net[2]._forward_pre_hooks.clear()
    assert no_hooks(net)


def test_substitute_leaves_no_hooks_after_errors() -> None:
    net = mlp()
    with pytest.raises(KDConfigError, match=r"shape \(5, 3\) but the network computes \(5, 4\)"):
        run_with_substitute(net, "1", torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(UnknownModuleError, match=r"close matches: '1'"):
        run_with_substitute(net, "1x", torch.randn(5, 3), torch.randn(5, 4))
    assert no_hooks(net)
    skip = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    skip.forward = lambda x: skip["used"](x)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="was not called"):
        run_with_substitute(skip, "unused", torch.randn(2, 3), torch.randn(2, 2))
    assert no_hooks(skip)


def test_preserved_buffers_keep_batchnorm_statistics_and_the_tensors_themselves() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    bn = net[1]
    mean, version = bn.running_mean, bn.running_mean._version
    before = mean.clone()
    h = torch.randn(8, 4) * 5 + 3
    out = run_with_substitute(net, "0", torch.randn(8, 3), h, preserve_buffers=True)
    torch.testing.assert_close(out, net[2](F.batch_norm(h, None, None, bn.weight, bn.bias, training=True)))
    assert bn.running_mean is mean and mean._version == version and torch.equal(mean, before)
    run_with_substitute(net, "0", torch.randn(8, 3), h)
    assert not torch.equal(bn.running_mean, before)  # without it the pass moves the statistics
    with preserved_buffers(net):
        net(torch.randn(8, 3))
    assert int(bn.num_batches_tracked) == 1
