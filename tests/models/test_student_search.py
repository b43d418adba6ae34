"""DisWOT student search (pure torch): the two similarity metrics by hand, the semantic fallback, the baselines,
the NAS-Bench-201 networks, the search spaces and regularised evolution (seeded, within budget, best parent)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.models import SmallCNN
from kd_lightning.models.search import (
    Budget,
    Candidate,
    CifarResNetSpace,
    DisWOTScorer,
    NB201Network,
    NB201Space,
    SmallCNNSpace,
    arch_string,
    build_space,
    class_gram_distance,
    count_cost,
    naswot_score,
    parse_arch,
    regularized_evolution,
    relation_distance,
    resolve_semantic_mode,
    search_students,
    select_parent,
    semantic_distance,
    zen_score,
)
from kd_lightning.models.search.nb201 import NB201Cell

A = 1 / math.sqrt(2)


# ---------------------------------------------------------------------------------------------- relation similarity
def test_relation_distance_by_hand() -> None:
    # teacher Gram = I (rows already unit); student Gram = [[2, 2], [2, 2]] -> rows [a, a], a = 1/sqrt(2)
    f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f_s = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    expected = 2 * ((1 - A) ** 2 + A**2) / 4  # = (2 - sqrt 2) / 2
    assert float(relation_distance(f_t, f_s)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx((2 - math.sqrt(2)) / 2)


def test_relation_distance_flattens_maps_and_is_width_agnostic() -> None:
    torch.manual_seed(0)
    f_t = torch.randn(5, 8, 3, 3)
    f_s = torch.randn(5, 2, 4, 4)  # other width and resolution
    flat_t, flat_s = f_t.reshape(5, -1), f_s.reshape(5, -1)
    g_t = flat_t @ flat_t.T
    g_s = flat_s @ flat_s.T
    g_t = g_t / g_t.norm(dim=1, keepdim=True)
    g_s = g_s / g_s.norm(dim=1, keepdim=True)
    assert float(relation_distance(f_t, f_s)) == pytest.approx(float(((g_t - g_s) ** 2).sum() / 25), rel=1e-5)
    assert float(relation_distance(f_t, f_t)) == pytest.approx(0.0, abs=1e-7)
    # a positive scale of the features changes nothing (the Gram rows are normalised)
    assert float(relation_distance(f_t, 3.0 * f_s)) == pytest.approx(float(relation_distance(f_t, f_s)), rel=1e-5)


# ---------------------------------------------------------------------------------------------- semantic similarity
def test_semantic_distance_by_hand() -> None:
    # K = 1, C = 2. E_T = [[1, 0], [0, 0]] -> rows [1, 0], [0, 0]; E_S = [[1, 1], [1, 1]] -> rows [a, a]
    g_t = torch.tensor([[1.0, 0.0]])
    g_s = torch.tensor([[1.0, 1.0]])
    expected = ((1 - A) ** 2 + A**2 + 2 * A**2) / (2 * 1)  # = (3 - sqrt 2) / 2
    assert float(semantic_distance(g_t, g_s)) == pytest.approx(expected, abs=1e-6)


def test_semantic_distance_matches_a_loop_and_its_invariances() -> None:
    torch.manual_seed(1)
    g_t, g_s = torch.randn(3, 4), torch.randn(3, 4)
    total = 0.0
    for k in range(3):
        e_t = torch.outer(g_t[k], g_t[k])
        e_s = torch.outer(g_s[k], g_s[k])
        for i in range(4):
            total += float(((e_s[i] / e_s[i].norm() - e_t[i] / e_t[i].norm()) ** 2).sum())
    assert float(semantic_distance(g_t, g_s)) == pytest.approx(total / (4 * 3), rel=1e-5)
    assert float(semantic_distance(g_t, g_t)) == pytest.approx(0.0, abs=1e-7)
    assert float(semantic_distance(g_t, -2.0 * g_t)) == pytest.approx(0.0, abs=1e-6)  # g g^T ignores sign and scale


def test_class_gram_fallback_by_hand() -> None:
    # K = 2: teacher M = I (C = 2), student M = [[1, 1], [1, 1]] (C = 1): the relation example again, over classes
    g_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g_s = torch.tensor([[1.0], [1.0]])
    assert float(class_gram_distance(g_t, g_s)) == pytest.approx((2 - math.sqrt(2)) / 2, abs=1e-6)


def test_semantic_fallback_when_widths_differ() -> None:
    with pytest.raises(KDConfigError, match="semantic_mode"):
        semantic_distance(torch.randn(10, 128), torch.randn(10, 16))
    assert resolve_semantic_mode("auto", 64, [64]) == ("channel", None)
    mode, note = resolve_semantic_mode("auto", 128, [16, 32])
    assert mode == "class_gram" and note is not None and "128" in note
    with pytest.raises(KDConfigError, match=r"score\.semantic_mode.*\[16, 32\]"):
        resolve_semantic_mode("channel", 128, [16, 32, 128])
    with pytest.raises(KDConfigError, match=r"score\.semantic_mode"):
        resolve_semantic_mode("cosine", 128, [128])


def _data(n: int = 16, channels: int = 1, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.arange(n) % 10


def test_scorer_fallback_and_teacher_left_alone() -> None:
    torch.manual_seed(0)
    teacher = SmallCNN(widths=(8, 16), dropout=0.2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.eval()
    scorer = DisWOTScorer(teacher, [_data()])
    narrow = scorer.score(SmallCNN(widths=(4, 8)))
    assert narrow["semantic_mode"] == "class_gram" and math.isfinite(narrow["semantic"])
    assert narrow["score"] == pytest.approx(narrow["semantic"] + narrow["relation"])
    assert narrow["semantic"] < 0 and narrow["relation"] < 0
    assert scorer.score(SmallCNN(widths=(4, 16)))["semantic_mode"] == "channel"
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    with pytest.raises(KDConfigError, match="semantic_mode"):
        DisWOTScorer(teacher, [_data()], semantic_mode="channel").score(SmallCNN(widths=(4, 8)))


def test_scorer_is_zero_for_the_teacher_itself_and_leaves_student_grads() -> None:
    torch.manual_seed(0)
    teacher = SmallCNN(widths=(8, 16))
    student = SmallCNN(widths=(8, 16))
    student.load_state_dict(teacher.state_dict())
    scorer = DisWOTScorer(teacher, [_data(), _data(seed=1)])
    result = scorer.score(student)
    assert result["semantic"] == pytest.approx(0.0, abs=1e-7) and result["relation"] == pytest.approx(0.0, abs=1e-7)
    assert all(p.grad is None for p in student.parameters())
    only_relation = DisWOTScorer(teacher, [_data()], semantic_weight=0.0).score(SmallCNN(widths=(4,)))
    assert math.isnan(only_relation["semantic"]) and only_relation["score"] == only_relation["relation"]
    with pytest.raises(KDConfigError, match=r"score\.semantic_weight"):
        DisWOTScorer(teacher, [_data()], semantic_weight=0.0, relation_weight=0.0)
    with pytest.raises(KDConfigError, match=r"score\.relation_weight"):
        DisWOTScorer(teacher, [_data()], relation_weight=-1.0)


def test_semantic_term_uses_the_classifier_weight_gradient() -> None:
    """The semantic term equals semantic_distance of dCE/dW_fc computed independently (BN in train mode)."""
    torch.manual_seed(0)
    teacher, student = SmallCNN(widths=(4, 8)), SmallCNN(widths=(6, 8))
    x, y = _data()
    grads = []
    for net in (teacher, student):
        net.train()
        loss = F.cross_entropy(net(x), y)
        grads.append(torch.autograd.grad(loss, net.fc.weight)[0])
    expected = -float(semantic_distance(grads[0], grads[1]))
    result = DisWOTScorer(teacher, [(x, y)], relation_weight=0.0, semantic_mode="channel").score(student)
    assert result["semantic"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- baselines
def test_naswot_by_hand() -> None:
    x = torch.tensor([[1.0, -1.0, 2.0], [-1.0, -1.0, 3.0]])
    # codes [1, 0, 1] and [0, 0, 1]: K = [[3, 2], [2, 3]], det 5
    assert naswot_score(nn.Sequential(nn.ReLU()), x) == pytest.approx(math.log(5.0))
    # two ReLUs with the same pattern: the kernels add up, [[6, 4], [4, 6]], det 20
    assert naswot_score(nn.Sequential(nn.ReLU(), nn.ReLU()), x) == pytest.approx(math.log(20.0))
    # identical samples: singular kernel
    assert naswot_score(nn.Sequential(nn.ReLU()), torch.ones(2, 3)) == -math.inf
    assert math.isnan(naswot_score(nn.Sequential(nn.Identity()), x))


def test_count_cost_by_hand() -> None:
    net = SmallCNN(widths=(4,))
    # conv 3x3, 1 -> 4 over 8x8 = 9*4*64 MACs; fc 4 -> 10 = 40 MACs; params: conv 36 + BN 8 + fc 50
    assert count_cost(net, (1, 8, 8)) == {"params": 94, "flops": 2 * (9 * 4 * 64 + 40)}
    # an NB201 cell network: params counted by hand from its modules' shapes
    cell = NB201Network("|none~0|+|none~0|none~1|+|nor_conv_1x1~0|none~1|none~2|", 2, 1, 1, num_classes=3)
    stem = 9 * 2 + 4  # conv 1 -> 2, BN
    cells = (2 * 2 + 4) + (4 * 4 + 8) + (8 * 8 + 16)  # one 1x1 ReLU-conv-BN per stage (C = 2, 4, 8)
    reductions = (9 * 2 * 4 + 8 + 9 * 4 * 4 + 8 + 2 * 4) + (9 * 4 * 8 + 16 + 9 * 8 * 8 + 16 + 4 * 8)
    head = 16 + 8 * 3 + 3  # last BN, fc
    assert count_cost(cell, (1, 8, 8))["params"] == stem + cells + reductions + head


def test_zen_proxy_is_seeded_and_leaves_the_model() -> None:
    torch.manual_seed(0)
    net = SmallCNN(widths=(8, 16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = zen_score(net, (1, 8, 8), generator=torch.Generator().manual_seed(3))
    b = zen_score(net, (1, 8, 8), generator=torch.Generator().manual_seed(3))
    assert math.isfinite(a) and a == b
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------------------------- NAS-Bench-201
def test_nb201_arch_strings_and_cells() -> None:
    ops = ("nor_conv_3x3", "none", "skip_connect", "nor_conv_1x1", "avg_pool_3x3", "none")
    text = arch_string(ops)
    assert text == "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|nor_conv_1x1~0|avg_pool_3x3~1|none~2|"
    assert parse_arch(text) == ops and parse_arch(list(ops)) == ops
    with pytest.raises(KDConfigError, match="sep_conv"):
        parse_arch("|sep_conv~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    with pytest.raises(KDConfigError, match="arch"):
        parse_arch("|none~0|+|none~0|")
    # node 3 = skip(node 0) and everything else absent: the cell is the identity
    identity = NB201Cell(("none", "none", "none", "skip_connect", "none", "none"), 4)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(identity(x), x)
    # node 1 = x, node 2 = node 1 + x = 2x, node 3 = node 2 = 2x
    doubling = NB201Cell(("skip_connect", "skip_connect", "skip_connect", "none", "none", "skip_connect"), 4)
    assert torch.allclose(doubling(x), 2 * x)
    net = NB201Network(text, channels=4, cells_per_stage=2, in_channels=1, num_classes=7)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 7) and net.fc.in_features == 16


# ---------------------------------------------------------------------------------------------- spaces
def test_spaces_sample_mutate_and_configs() -> None:
    rng = random.Random(0)
    space = SmallCNNSpace(widths=(4, 8, 16), depths=(1, 2, 3), final_width=16)
    for _ in range(50):
        arch = space.sample(rng)
        child = space.mutate(arch, rng)
        assert child != arch and child[-1] == 16 and 1 <= len(child) <= 3 and set(child) <= {4, 8, 16}
    config = space.class_config((4, 16), 10)
    assert config == {
        "class_path": "kd_lightning.models.SmallCNN",
        "init_args": {"in_channels": 1, "widths": [4, 16], "num_classes": 10},
    }
    nb = NB201Space(channels=4, cells_per_stage=1, in_channels=1, image_size=8)
    arch = nb.sample(rng)
    child = nb.mutate(arch, rng)
    assert sum(a != b for a, b in zip(arch, child)) == 1
    assert nb.build(arch, 10)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    resnets = CifarResNetSpace(depths=(8, 14), widths=(4, 8))
    arch = resnets.sample(rng)
    assert list(arch[1:]) == sorted(arch[1:]) and resnets.build(arch, 5)(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(KDConfigError, match=r"space\.depths"):
        SmallCNNSpace(depths=(1, 5), image_size=8)  # 8x8 allows 4 blocks
    with pytest.raises(KDConfigError, match=r"space\.widthz"):
        build_space({"kind": "smallcnn", "widthz": [4]})
    with pytest.raises(KDConfigError, match=r"space\.kind"):
        build_space({"kind": "darts"})


# ---------------------------------------------------------------------------------------------- evolution
def _member(score: float, i: int) -> Candidate:
    return Candidate(arch=(i,), score=score, params=1, flops=1)


def test_tournament_picks_the_best_of_the_sample() -> None:
    scores = [-3.0, -1.0, -2.0, -5.0, -4.0, -0.5, -6.0, -7.0]
    sample = [_member(s, i) for i, s in enumerate(scores)]
    rng = random.Random(0)
    assert select_parent(sample, rng, "best").score == -0.5
    # the official code: ascending sort, random among the first five = among the worst
    worst_five = sorted(scores)[:5]
    picks = {select_parent(sample, rng, "official").score for _ in range(200)}
    assert picks <= set(worst_five) and -0.5 not in picks
    with pytest.raises(KDConfigError, match=r"evolution\.parent_selection"):
        select_parent(sample, rng, "worst")


def _tiny_scorer() -> DisWOTScorer:
    torch.manual_seed(5)
    return DisWOTScorer(SmallCNN(widths=(8, 16, 32)), [_data(n=12)])


def test_evolution_is_deterministic_and_respects_the_budget() -> None:
    space = SmallCNNSpace(widths=(4, 8, 16, 32), depths=(1, 2, 3))
    scorer = _tiny_scorer()
    budget = Budget(max_params=3000)
    kwargs = {"population_size": 5, "sample_size": 3, "cycles": 12, "baselines": False}
    first = search_students(space, scorer, 10, budget, seed=7, **kwargs)
    second = search_students(space, scorer, 10, budget, seed=7, **kwargs)
    assert [(m.arch, m.score) for m in first.history] == [(m.arch, m.score) for m in second.history]
    assert len(first.history) == 5 + 12 - first.skipped_children
    assert all(m.params <= 3000 for m in first.history)
    assert all(count_cost(space.build(m.arch, 10), (1, 8, 8))["params"] == m.params for m in first.ranking)
    scores = [m.score for m in first.ranking]
    assert scores == sorted(scores, reverse=True) and first.winner.score == max(scores)
    other = search_students(space, scorer, 10, budget, seed=8, **kwargs)
    assert [m.arch for m in other.history] != [m.arch for m in first.history]


def test_best_parent_beats_the_official_tournament_on_a_known_objective() -> None:
    """With a score that rewards width (mutations change one of three blocks), the fixed tournament climbs; the
    official one (a parent among the worst of the sample) does not."""
    space = SmallCNNSpace(widths=(4, 8, 16, 32, 64), depths=(3,))

    def score(arch: tuple) -> tuple[float, dict]:
        return float(sum(arch)), {}

    def cost(arch: tuple) -> tuple[int, int]:
        return 1, 1

    results = {}
    for mode in ("best", "official"):
        late = []
        for seed in range(5):
            result = regularized_evolution(
                space,
                score,
                cost,
                Budget(),
                population_size=6,
                sample_size=6,
                cycles=60,
                seed=seed,
                parent_selection=mode,
            )
            late += [m.score for m in result.history[-20:]]
        results[mode] = sum(late) / len(late)
    assert results["best"] > results["official"] + 20


def test_no_candidate_under_the_budget_names_the_field() -> None:
    space = SmallCNNSpace(widths=(4, 8), depths=(1, 2))
    scorer = _tiny_scorer()
    with pytest.raises(KDConfigError, match=r"^budget\.max_params: .*smallcnn-4, has 94\b.*raise budget\.max_params"):
        search_students(space, scorer, 10, Budget(max_params=50), population_size=2, cycles=1)
    with pytest.raises(KDConfigError, match=r"^budget\.max_flops: .*4,688"):
        search_students(space, scorer, 10, Budget(max_flops=1000), population_size=2, cycles=1)
    with pytest.raises(KDConfigError, match=r"budget\.max_params"):
        Budget(max_params=-1)
