"""FeatureTaps: values equal a hand-split forward, error messages, hook life cycle, in-place safety."""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

from kd_lightning.models import FeatureTaps, UnknownModuleError, module_names


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Linear(4, 8),
            body=nn.Sequential(nn.ReLU(), nn.Linear(8, 8), nn.Tanh()),
            head=nn.Linear(8, 3),
        )
    )


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_values_equal_hand_split_forward() -> None:
    model = tiny()
    x = torch.randn(5, 4)
    h0 = model.stem(x)
    h1 = model.body[0](h0)
    h2 = model.body[1](h1)
    h3 = model.body[2](h2)
    out = model.head(h3)

    names = ["head", "body.1:input", "stem", "body.2:input", "body", "head:input", "stem:input", "body.0:output"]
    taps = FeatureTaps(model, names)
    logits, feats = taps(x)
    assert list(feats) == names
    torch.testing.assert_close(logits, out)
    expected = {
        "head": out,
        "body.1:input": h1,
        "stem": h0,
        "body.2:input": h2,
        "body": h3,
        "head:input": h3,
        "stem:input": x,
        "body.0:output": h1,
    }
    for name, value in expected.items():
        torch.testing.assert_close(feats[name], value, msg=name)
    assert feats["stem:input"] is x
    # the features are handed over, not kept
    assert taps.features == {}


def test_no_change_to_model_output_and_grad_flow() -> None:
    model = tiny()
    x = torch.randn(3, 4)
    reference = model(x)
    taps = FeatureTaps(model, ["body.1", "body.2:input"])
    out, feats = taps(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)  # hooks idle outside taps
    assert feats["body.1"].requires_grad
    feats["body.1"].sum().backward()
    assert model.body[1].weight.grad is not None and model.head.weight.grad is None

    detached = FeatureTaps(model, ["body.1"], detach=True)
    _, feats = detached(x)
    assert not feats["body.1"].requires_grad


def test_context_manager_and_no_grad() -> None:
    model = tiny()
    x = torch.randn(2, 4)
    taps = FeatureTaps(model, ["body.0:input", "head"])
    with torch.no_grad(), taps:
        out = model(x)
    assert list(taps.features) == ["body.0:input", "head"]
    torch.testing.assert_close(taps.features["head"], out)
    torch.testing.assert_close(taps.features["body.0:input"], model.stem(x))
    assert not taps.features["head"].requires_grad
    # outside the context the hooks record nothing (and keep nothing alive)
    taps.clear()
    model(x)
    assert taps.features == {}
    with torch.inference_mode(), taps:
        model(x)
    assert set(taps.features) == {"body.0:input", "head"}


def test_hooks_registered_once_and_removed() -> None:
    model = tiny()
    taps = FeatureTaps(model, ["stem", "head:input", "stem"])  # duplicates collapse
    assert taps.names == ("stem", "head:input")
    assert n_hooks(model) == 2 and taps.registered
    for _ in range(3):
        taps(torch.randn(1, 4))
        with taps:
            model(torch.randn(1, 4))
    assert n_hooks(model) == 2
    taps.remove()
    assert n_hooks(model) == 0 and not taps.registered and taps.features == {}
    # using the taps again re-attaches them
    _, feats = taps(torch.randn(1, 4))
    assert set(feats) == {"stem", "head:input"} and n_hooks(model) == 2
    taps.remove()
    assert n_hooks(model) == 0


def test_unknown_name_lists_close_matches() -> None:
    model = tiny()
    with pytest.raises(KeyError) as info:
        FeatureTaps(model, ["body.3"])
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, UnknownModuleError)
    msg = str(err)
    assert "Sequential" in msg and "'body.3'" in msg
    assert "'body.0'" in msg and "'body.1'" in msg and "'body.2'" in msg
    assert n_hooks(model) == 0

    with pytest.raises(ValueError, match=r"close matches: 'head'"):
        FeatureTaps(model, ["haed:input"])
    with pytest.raises(ValueError, match="no close match"):
        FeatureTaps(model, ["zzzzzzzz"])
    with pytest.raises(ValueError, match="'input' or 'output'"):
        FeatureTaps(model, ["head:inputs"])


def test_close_matches_are_capped_at_five() -> None:
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(12)))
    with pytest.raises(ValueError, match="close matches") as info:
        FeatureTaps(model, ["13"])
    listed = str(info.value).split("close matches: ")[1].split(". List all")[0]
    assert 1 <= len(re.findall(r"'\d+'", listed)) <= 5


def test_module_names_and_single_string() -> None:
    model = tiny()
    assert module_names(model) == ["stem", "body", "body.0", "body.1", "body.2", "head"]
    taps = FeatureTaps(model, "body")
    assert taps.names == ("body",)
    assert "Sequential" in repr(taps)


def test_tap_that_does_not_fire() -> None:
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny()
            self.unused = nn.Linear(1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    with pytest.raises(RuntimeError, match=r"\['unused'\] of WithUnused did not fire"):
        FeatureTaps(WithUnused(), ["unused", "net.head"])(torch.randn(1, 4))


def test_inplace_overwrite_is_detected_or_cloned() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    pre = model[0](x).detach()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"in place.*clone=True"):
        FeatureTaps(model, ["0"])(x)
    with torch.no_grad():
        _, feats = FeatureTaps(model, ["0", "1:input", "1"], clone=True)(x)
    torch.testing.assert_close(feats["0"], pre)
    torch.testing.assert_close(feats["1:input"], pre)
    torch.testing.assert_close(feats["1"], pre.clamp(min=0))


def test_keyword_input() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(input=x)

    model = Wrapper()
    x = torch.randn(2, 3)
    _, feats = FeatureTaps(model, ["inner:input"])(x)
    assert feats["inner:input"] is x


def test_module_reused_keeps_last_call() -> None:
    act = nn.Tanh()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = act

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.act(x))

    x = torch.randn(3)
    _, feats = FeatureTaps(Twice(), ["act:input"])(x)
    torch.testing.assert_close(feats["act:input"], torch.tanh(x))


def test_transient_taps_hold_no_hooks_between_uses_and_pickle() -> None:
    import pickle

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    taps = FeatureTaps(model, ["0", "2:input"], transient=True)
    assert not taps.registered and not model[0]._forward_hooks
    _, feats = taps(torch.randn(5, 3))
    assert feats["0"].shape == (5, 4) and torch.equal(feats["2:input"], torch.relu(feats["0"]))
    assert not taps.registered and not model[0]._forward_hooks and not model[2]._forward_pre_hooks
    copy = pickle.loads(pickle.dumps((model, taps)))
    _, feats_copy = copy[1](torch.ones(1, 3))
    assert feats_copy["0"].shape == (1, 4)
    with pytest.raises(TypeError, match="transient=True"):
        pickle.dumps(FeatureTaps(model, ["0"]))
