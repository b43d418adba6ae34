"""CRD's memory and NCE loss: hand computations on tiny banks, sampling, the momentum update, DDP (gloo)."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_lightning.losses.contrastive import ContrastiveMemory, CRDLoss, EmbedHead, all_gather_cat, nce_loss


def _normalise(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _reference_side(scores: list[list[float]], z: float, n: int, eps: float = 1e-7) -> float:
    """RepDistiller's ContrastLoss on P = exp(score)/Z, written out with math (including its eps)."""
    m = len(scores[0]) - 1
    c = m / n
    total = 0.0
    for row in scores:
        p = [math.exp(s) / z for s in row]
        total += math.log(p[0] / (p[0] + c + eps))
        total += sum(math.log(c / (q + c + eps)) for q in p[1:])
    return -total / len(scores)


def _identity_heads(loss: CRDLoss) -> None:
    for head in (loss.embed_student, loss.embed_teacher):
        with torch.no_grad():
            head.linear.weight.copy_(torch.eye(head.linear.out_features, head.linear.in_features))
            head.linear.bias.zero_()


# ---------------------------------------------------------------------------------------------- NCE loss
def test_nce_loss_matches_the_reference_formula() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.5, 0.3]], dtype=torch.float64)
    log_z, n = math.log(7.0), 10
    expected = _reference_side(logits.tolist(), 7.0, n)
    assert nce_loss(logits, log_z, n).item() == pytest.approx(expected, rel=1e-6)


def test_nce_loss_rewards_a_high_positive_and_low_negatives() -> None:
    good = torch.tensor([[10.0, -10.0, -10.0]])
    bad = torch.tensor([[-10.0, 10.0, 10.0]])
    assert nce_loss(good, 0.0, 4).item() < 1e-3 < nce_loss(bad, 0.0, 4).item()
    # no overflow at a tiny temperature (scores of 1/0.001)
    assert torch.isfinite(nce_loss(torch.tensor([[1000.0, -1000.0, 900.0]]), 950.0, 4))


def test_nce_loss_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\[batch, 1 \+ K\]"):
        nce_loss(torch.zeros(3), 0.0, 4)
    with pytest.raises(ValueError, match=r"K >= 1"):
        nce_loss(torch.zeros(3, 1), 0.0, 4)


# ---------------------------------------------------------------------------------------------- CRD on tiny banks
def _tiny_loss() -> CRDLoss:
    loss = CRDLoss(
        2, 2, num_samples=4, embed_dim=2, num_negatives=2, temperature=0.5, momentum=0.5, sampling="instance"
    )
    _identity_heads(loss)
    with torch.no_grad():
        loss.memory.student_bank.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))
        loss.memory.teacher_bank.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, -0.6], [0.6, 0.8]]))
    return loss


def test_crd_loss_on_tiny_banks_by_hand() -> None:
    loss = _tiny_loss()
    s_bank, t_bank = loss.memory.student_bank.tolist(), loss.memory.teacher_bank.tolist()
    f_s = [[3.0, 4.0], [1.0, -1.0]]
    f_t = [[0.0, 2.0], [-2.0, 1.0]]
    index = [2, 0]
    contrast = [[2, 0, 3], [0, 1, 1]]
    tau, n = 0.5, 4
    v_s = [_normalise(f) for f in f_s]
    v_t = [_normalise(f) for f in f_t]
    # student anchor: its embedding against the TEACHER bank; teacher anchor: against the STUDENT bank
    scores_s = [[_dot(v_s[b], t_bank[j]) / tau for j in contrast[b]] for b in range(2)]
    scores_t = [[_dot(v_t[b], s_bank[j]) / tau for j in contrast[b]] for b in range(2)]
    z_s = n * sum(math.exp(x) for row in scores_s for x in row) / 6  # Z = N · mean(exp(score)) on the first batch
    z_t = n * sum(math.exp(x) for row in scores_t for x in row) / 6
    expected_s = _reference_side(scores_s, z_s, n)
    expected_t = _reference_side(scores_t, z_t, n)

    out = loss(torch.tensor(f_s), torch.tensor(f_t), torch.tensor(index), contrast_index=torch.tensor(contrast))
    assert loss.log_z.tolist() == pytest.approx([math.log(z_s), math.log(z_t)], rel=1e-6)
    assert out["student_anchor"].item() == pytest.approx(expected_s, rel=1e-5)
    assert out["teacher_anchor"].item() == pytest.approx(expected_t, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected_s + expected_t, rel=1e-5)

    # momentum update of the batch's rows, by hand: normalise(0.5·old + 0.5·v); other rows untouched
    for bank, old, v in ((loss.memory.student_bank, s_bank, v_s), (loss.memory.teacher_bank, t_bank, v_t)):
        for b, i in enumerate(index):
            mixed = [0.5 * o + 0.5 * x for o, x in zip(old[i], v[b])]
            assert bank[i].tolist() == pytest.approx(_normalise(mixed), rel=1e-6)
        for i in (1, 3):
            assert bank[i].tolist() == old[i]

    # Z is estimated once: a second batch keeps it
    before = loss.log_z.clone()
    loss(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([1, 3]))
    assert torch.equal(loss.log_z, before)


def test_scores_use_the_banks_before_this_batch_update() -> None:
    """The positive is the bank row from earlier batches, not the current embedding (as in the official code)."""
    loss = _tiny_loss()
    t_bank = loss.memory.teacher_bank.clone()
    f_s, f_t, index = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([1])
    contrast = torch.tensor([[1, 0, 2]])
    first = loss(f_s, f_t, index, contrast_index=contrast, update=False)
    again = loss(f_s, f_t, index, contrast_index=contrast, update=True)
    assert again["loss"].item() == pytest.approx(first["loss"].item(), rel=1e-6)
    assert not torch.equal(loss.memory.teacher_bank, t_bank)  # updated only by the second call


def test_gradients_reach_student_features_and_both_heads_not_the_teacher_or_banks() -> None:
    torch.manual_seed(0)
    loss = CRDLoss(5, 3, num_samples=12, embed_dim=4, num_negatives=6, sampling="instance")
    f_s = torch.randn(3, 5, requires_grad=True)
    f_t = torch.randn(3, 3, requires_grad=True)
    loss(f_s, f_t, torch.tensor([0, 5, 7]))["loss"].backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None  # teacher features are detached
    assert loss.embed_student.linear.weight.grad.abs().sum() > 0
    assert loss.embed_teacher.linear.weight.grad.abs().sum() > 0
    assert not loss.memory.student_bank.requires_grad and not loss.memory.teacher_bank.requires_grad


def test_embed_head_is_linear_then_unit_norm() -> None:
    head = EmbedHead(6, 3)
    out = head(torch.randn(4, 2, 3).to(torch.bfloat16).float())
    assert out.shape == (4, 3) and out.dtype == torch.float32
    assert out.norm(dim=1).tolist() == pytest.approx([1.0] * 4, rel=1e-5)


# ---------------------------------------------------------------------------------------------- memory
def test_memory_init_as_official_and_update_keeps_rows_unit_norm() -> None:
    torch.manual_seed(0)
    memory = ContrastiveMemory(2000, 12, momentum=0.5)
    bound = 1 / math.sqrt(12 / 3)
    assert memory.student_bank.abs().max() <= bound and memory.teacher_bank.abs().max() <= bound
    assert memory.student_bank.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=0.05)  # E‖row‖² = 1
    memory.update_(torch.tensor([3, 9]), torch.randn(2, 12), torch.randn(2, 12))
    assert memory.student_bank[[3, 9]].norm(dim=1).tolist() == pytest.approx([1.0, 1.0], rel=1e-6)


def test_momentum_update_by_hand_with_a_repeated_index_last_wins() -> None:
    memory = ContrastiveMemory(3, 2, momentum=0.25)
    with torch.no_grad():
        memory.student_bank.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        memory.teacher_bank.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]))
    s = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.8, 0.6]])
    memory.update_(torch.tensor([0, 2, 0]), s, t)
    # row 0 gets the LAST of its two embeddings: normalise(0.25·[1,0] + 0.75·[0.6,0.8]) = normalise([0.7, 0.6])
    assert memory.student_bank[0].tolist() == pytest.approx(_normalise([0.7, 0.6]), rel=1e-6)
    assert memory.student_bank[2].tolist() == pytest.approx(_normalise([0.75, -0.25]), rel=1e-6)
    assert memory.student_bank[1].tolist() == [0.0, 1.0]
    assert memory.teacher_bank[0].tolist() == pytest.approx(_normalise([0.6, 0.7]), rel=1e-6)
    assert memory.teacher_bank[2].tolist() == pytest.approx(_normalise([-0.25, -0.75]), rel=1e-6)


def test_exact_sampling_never_draws_the_positive_nor_its_class() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3])
    memory = ContrastiveMemory(12, 4, labels=labels)
    index = torch.arange(12).repeat(20)
    generator = torch.Generator().manual_seed(0)
    drawn = memory.sample(index, 5, "exact", generator=generator)  # 5 <= 12 - 4: without replacement
    assert drawn.shape == (240, 6) and torch.equal(drawn[:, 0], index)
    assert (labels[drawn[:, 1:]] != labels[index][:, None]).all()
    assert all(len(set(row)) == 5 for row in drawn[:, 1:].tolist())  # distinct negatives
    assert set(drawn[:, 1:].flatten().tolist()) == set(range(12))  # every sample serves as a negative
    # K above what the largest class leaves (8): those anchors draw with replacement, still from other classes
    drawn = memory.sample(index, 10, "exact", generator=generator)
    assert (labels[drawn[:, 1:]] != labels[index][:, None]).all()
    assert (drawn[:, 1:] != index[:, None]).all()


def test_instance_sampling_never_draws_the_positive_and_uniform_covers_all() -> None:
    memory = ContrastiveMemory(6, 2)
    index = torch.arange(6).repeat(50)
    drawn = memory.sample(index, 5, "instance")
    assert (drawn[:, 1:] != index[:, None]).all()
    assert set(drawn[:, 1:].flatten().tolist()) == set(range(6))
    drawn = memory.sample(index, 5, "uniform")
    assert drawn[:, 1:].min() >= 0 and drawn[:, 1:].max() <= 5
    assert (drawn[:, 1:] == index[:, None]).any()  # the cheap mode may draw the positive


def test_num_negatives_above_n_minus_one_is_clipped_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"num_negatives=100 exceeds the 4 other samples.*using num_negatives=4"):
        loss = CRDLoss(3, 3, num_samples=5, embed_dim=2, num_negatives=100, sampling="instance")
    assert loss.num_negatives == 4
    out = loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 4]))
    assert torch.isfinite(out["loss"])


def test_state_dict_round_trip_keeps_banks_labels_and_z() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    loss = CRDLoss(3, 4, num_samples=6, embed_dim=2, num_negatives=3, labels=labels)
    loss(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([1, 4]))
    state = loss.state_dict()
    assert {"log_z", "memory.student_bank", "memory.teacher_bank", "memory.labels"} <= set(state)
    fresh = CRDLoss(3, 4, num_samples=6, embed_dim=2, num_negatives=3, labels=torch.zeros(6, dtype=torch.long))
    assert not fresh.z_is_set
    fresh.load_state_dict(state)
    assert fresh.z_is_set and torch.equal(fresh.log_z, loss.log_z)
    assert torch.equal(fresh.memory.labels, labels) and fresh.memory.min_negatives() == 4
    assert torch.equal(fresh.memory.teacher_bank, loss.memory.teacher_bank)


def test_bad_inputs_have_clear_messages() -> None:
    with pytest.raises(ValueError, match=r"sampling must be one of"):
        CRDLoss(2, 2, sampling="hard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sampling='exact'.*needs labels"):
        CRDLoss(2, 2, num_samples=4)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        ContrastiveMemory(4, 2, momentum=1.0)
    with pytest.raises(ValueError, match=r"num_samples >= 2"):
        ContrastiveMemory(1, 2)
    with pytest.raises(ValueError, match=r"one class per sample \(4\)"):
        ContrastiveMemory(4, 2, labels=torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"no memory yet"):
        CRDLoss(2, 2)(torch.randn(1, 2), torch.randn(1, 2), torch.tensor([0]))
    loss = CRDLoss(2, 2, num_samples=4, embed_dim=2, num_negatives=2, sampling="instance")
    with pytest.raises(ValueError, match=r"same batch size"):
        loss(torch.randn(2, 2), torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"contrast_index must be \[B=2, 1 \+ K\]"):
        loss(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([0, 1]), contrast_index=torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"num_negatives must be in \[1, N - 1 = 3\]"):
        loss.memory.sample(torch.tensor([0]), 4, "instance")


# ---------------------------------------------------------------------------------------------- DDP (gloo, 2 ranks)
STEPS = 3
PER_RANK = 4
N, DIM, FEAT = 10, 3, 5


def _ddp_data() -> list[dict[str, torch.Tensor]]:
    """Per-step batches of both ranks (rank r takes rows r·PER_RANK..); rank 1 repeats one of rank 0's indices."""
    g = torch.Generator().manual_seed(123)
    steps = []
    for _ in range(STEPS):
        index = torch.randperm(N, generator=g)[: 2 * PER_RANK]
        index[PER_RANK] = index[0]  # the same sample on both ranks (DistributedSampler padding): last wins
        steps.append(
            {
                "index": index,
                "s": torch.randn(2 * PER_RANK, FEAT, generator=g),
                "t": torch.randn(2 * PER_RANK, FEAT, generator=g),
                "contrast": torch.cat([index[:, None], torch.randint(0, N, (2 * PER_RANK, 4), generator=g)], 1),
            }
        )
    return steps


def _make_loss(bank_seed: int) -> CRDLoss:
    torch.manual_seed(0)  # same heads everywhere (DDP would broadcast them too)
    loss = CRDLoss(FEAT, FEAT, num_samples=N, embed_dim=DIM, num_negatives=4, sampling="instance")
    torch.manual_seed(bank_seed)  # different banks per rank: the first use broadcasts rank 0's
    with torch.no_grad():
        loss.memory.student_bank.uniform_(-1, 1)
        loss.memory.teacher_bank.uniform_(-1, 1)
    return loss


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loss = _make_loss(bank_seed=rank)
        memory = ContrastiveMemory(N, DIM)
        torch.manual_seed(100 + rank)
        memory.student_bank.uniform_(-1, 1)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        values = []
        for step in _ddp_data():
            out_step = loss(
                step["s"][rows], step["t"][rows], step["index"][rows], contrast_index=step["contrast"][rows]
            )
            values.append(out_step["loss"].item())
            memory.update_(step["index"][rows], step["s"][rows, :DIM], step["t"][rows, :DIM])
        gathered = all_gather_cat(torch.full((rank + 1, 1), float(rank)), torch.arange(rank + 1)[:, None])
        torch.save(
            {
                "student_bank": loss.memory.student_bank,
                "teacher_bank": loss.memory.teacher_bank,
                "log_z": loss.log_z,
                "losses": values,
                "memory_bank": memory.student_bank,
                "gathered": [g.flatten().tolist() for g in gathered],
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
def test_ddp_banks_stay_identical_and_equal_one_process_over_the_concatenated_batch(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("student_bank", "teacher_bank", "log_z", "memory_bank"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[0]["gathered"] == [[0.0, 1.0, 1.0], [0, 0, 1]]  # uneven sizes are gathered in rank order

    # one process, rank 0's initial banks, the concatenated batches: the same banks, Z, and mean loss
    single = _make_loss(bank_seed=0)
    losses = []
    for step in _ddp_data():
        out = single(step["s"], step["t"], step["index"], contrast_index=step["contrast"])
        losses.append(out["loss"].item())
    torch.testing.assert_close(ranks[0]["student_bank"], single.memory.student_bank)
    torch.testing.assert_close(ranks[0]["teacher_bank"], single.memory.teacher_bank)
    torch.testing.assert_close(ranks[0]["log_z"], single.log_z)
    # equal batch sizes: the mean of the ranks' losses is the loss of the concatenated batch
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean == pytest.approx(losses, rel=1e-5)

    memory = ContrastiveMemory(N, DIM)
    torch.manual_seed(100)
    memory.student_bank.uniform_(-1, 1)
    for step in _ddp_data():
        memory.update_(step["index"], step["s"][:, :DIM], step["t"][:, :DIM])
    torch.testing.assert_close(ranks[0]["memory_bank"], memory.student_bank)
