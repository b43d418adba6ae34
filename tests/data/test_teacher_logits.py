"""Offline teacher logits: the top-k store written and read back, its fingerprints, the sparse KL, the command."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kd_lightning.commands.lm_teacher_logits import main
from kd_lightning.data.teacher_logits import (
    TeacherLogitStore,
    data_fingerprint,
    teacher_fingerprint,
    write_teacher_logits,
)
from kd_lightning.data.text import TokenSequences, collate_token_batch
from kd_lightning.errors import KDConfigError
from kd_lightning.losses.lm import forward_kl
from kd_lightning.losses.sparse import TopKTargets, sparse_kl, topk_targets
from kd_lightning.models.lm import TinyGPT

V = 24


def tiny_teacher(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    model = TinyGPT(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    with torch.no_grad():  # sharper than GPT-2's init, so that the top-k has no near-ties
        model.lm_head.weight.mul_(40.0)
    return model.eval()


def sequences(seed: int = 0, lengths: tuple[int, ...] = (5, 9, 12, 3, 7, 2)) -> TokenSequences:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    tokens = torch.randint(0, V, (int(lens.sum()),), generator=gen, dtype=torch.int32)
    return TokenSequences(tokens, torch.cumsum(lens, 0) - lens, lens)


def batches(dataset: TokenSequences, batch_size: int) -> list[dict[str, torch.Tensor]]:
    collate = partial(collate_token_batch, pad_token_id=0)
    return list(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate))


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, TinyGPT, TokenSequences]:
    teacher, data = tiny_teacher(), sequences()
    write_teacher_logits(teacher, data, tmp_path / "store", k=5, batch_size=4)
    return tmp_path / "store", teacher, data


# ---------------------------------------------------------------------------------------- write and read
def test_written_topk_is_torch_topk_of_the_teachers_log_softmax(store) -> None:
    path, teacher, data = store
    header = json.loads((path / "header.json").read_text())
    assert header["k"] == 5 and header["vocab_size"] == V and header["num_tokens"] == int(data.lengths.sum())
    logprobs = np.load(path / "logprobs.npy", mmap_mode="r")
    indices = np.load(path / "indices.npy", mmap_mode="r")
    tail = np.load(path / "tail_logmass.npy", mmap_mode="r")
    assert logprobs.dtype == np.float16 and indices.dtype == np.int32 and logprobs.shape == (header["num_tokens"], 5)
    row = 0
    for batch in batches(data, 4):  # the writer's batches: bit-identical teacher logits
        with torch.no_grad():
            logits = teacher(batch["input_ids"], batch["attention_mask"])
        logp = F.log_softmax(logits.float(), -1)
        logp64 = F.log_softmax(logits.double(), -1)
        for b in range(len(batch["sample_index"])):
            n = int(batch["attention_mask"][b].sum())
            values, idx = logp[b, :n].topk(5, dim=-1)
            assert np.array_equal(indices[row : row + n], idx.numpy())
            assert np.array_equal(logprobs[row : row + n], values.half().numpy())
            # tail = log(1 − Σ_topk p), in float64 (the float32 top-k sum would lose the small tails)
            expected_tail = torch.log(1 - logp64[b, :n].gather(-1, idx).exp().sum(-1))
            assert np.allclose(tail[row : row + n], expected_tail.numpy(), rtol=1e-5, atol=1e-6)
            row += n
    assert row == header["num_tokens"]


def test_store_returns_targets_aligned_with_any_batch_order_and_padding(store) -> None:
    path, teacher, data = store
    reader = TeacherLogitStore(path, teacher=teacher, dataset=data)
    batch = collate_token_batch([data[4], data[1], data[5]], pad_token_id=0)  # another order and grouping
    targets = reader.targets(batch)
    real = batch["attention_mask"]
    with torch.no_grad():
        exact = topk_targets(teacher(batch["input_ids"], real), 5)
    assert targets.logprobs.shape == (3, batch["input_ids"].shape[1], 5)
    assert torch.equal(targets.indices[real], exact.indices[real])
    assert torch.allclose(targets.logprobs[real], exact.logprobs[real], atol=5e-3, rtol=1e-3)
    assert torch.allclose(targets.tail_logmass[real], exact.tail_logmass[real], rtol=1e-5)
    # Left padding: the real tokens are found by attention_mask.
    left = {k: v.clone() for k, v in batch.items()}
    for b in range(3):
        n = int(real[b].sum())
        width = real.shape[1]
        left["input_ids"][b] = torch.cat([torch.zeros(width - n, dtype=torch.long), batch["input_ids"][b, :n]])
        left["attention_mask"][b] = torch.arange(width) >= width - n
    left_targets = reader.targets(left)
    assert torch.equal(left_targets.indices[left["attention_mask"]], targets.indices[real])
    shifted = targets.shifted()
    assert shifted.logprobs.shape[1] == batch["input_ids"].shape[1] - 1


def test_sparse_kl_with_k_equal_vocabulary_is_the_full_kl() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, V, generator=gen, dtype=torch.float64, requires_grad=True)
    t = 3 * torch.randn(2, 6, V, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 6, generator=gen) > 0.3
    targets = topk_targets(t, V)
    assert torch.isinf(targets.tail_logmass).all()
    for tail in ("bucket", "zero", "uniform"):
        got = sparse_kl(s, targets, mask, tail=tail)
        ref = forward_kl(s, t, mask=mask)
        assert got.item() == pytest.approx(ref.item(), rel=1e-12)
        g1, g2 = torch.autograd.grad(got, s)[0], torch.autograd.grad(ref, s)[0]
        assert torch.allclose(g1, g2, atol=1e-12)


def test_sparse_kl_through_the_fp16_store_is_close_to_the_full_kl(tmp_path: Path) -> None:
    teacher, data = tiny_teacher(1), sequences(1)
    write_teacher_logits(teacher, data, tmp_path / "full", k=V, batch_size=8)
    batch = batches(data, 8)[0]
    targets = TeacherLogitStore(tmp_path / "full").targets(batch)
    s = torch.randn(*batch["input_ids"].shape, V)
    with torch.no_grad():
        t = teacher(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"]
    assert sparse_kl(s, targets, mask).item() == pytest.approx(forward_kl(s, t, mask=mask).item(), rel=2e-3)


def test_tail_bucket_by_hand_on_four_tokens() -> None:
    p = [0.5, 0.25, 0.15, 0.1]  # teacher; top-2 = {0, 1}, tail mass 0.25
    q = [0.4, 0.3, 0.2, 0.1]  # student
    student = torch.tensor([[math.log(v) for v in q]], dtype=torch.float64)
    targets = topk_targets(torch.tensor([[math.log(v) for v in p]], dtype=torch.float64), 2)
    assert targets.indices.tolist() == [[0, 1]]
    assert targets.tail_logmass.item() == pytest.approx(math.log(0.25), rel=1e-12)
    bucket = 0.5 * math.log(0.5 / 0.4) + 0.25 * math.log(0.25 / 0.3) + 0.25 * math.log(0.25 / (0.2 + 0.1))
    assert sparse_kl(student, targets, tail="bucket").item() == pytest.approx(bucket, rel=1e-12)
    # zero: the teacher renormalised over its top-2 (2/3, 1/3)
    zero = (2 / 3) * math.log((2 / 3) / 0.4) + (1 / 3) * math.log((1 / 3) / 0.3)
    assert sparse_kl(student, targets, tail="zero").item() == pytest.approx(zero, rel=1e-12)
    # uniform: 0.25 spread as 0.125 over tokens 2 and 3
    uniform = 0.5 * math.log(0.5 / 0.4) + 0.25 * math.log(0.25 / 0.3)
    uniform += 0.125 * math.log(0.125 / 0.2) + 0.125 * math.log(0.125 / 0.1)
    assert sparse_kl(student, targets, tail="uniform").item() == pytest.approx(uniform, rel=1e-12)
    # a student equal to the teacher on the buckets has zero bucket KL
    same = torch.tensor([[math.log(v) for v in (0.5, 0.25, 0.2, 0.05)]], dtype=torch.float64)
    assert sparse_kl(same, targets).item() == pytest.approx(0.0, abs=1e-15)


def test_sparse_kl_reductions_and_shape_errors() -> None:
    s = torch.randn(2, 3, V)
    targets = topk_targets(torch.randn(2, 3, V), 4)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    none = sparse_kl(s, targets, mask, reduction="none")
    assert none.shape == (2, 3) and (none[~mask] == 0).all()
    assert sparse_kl(s, targets, mask, reduction="sum").item() == pytest.approx(none.sum().item(), rel=1e-6)
    assert sparse_kl(s, targets, mask).item() == pytest.approx(none.sum().item() / 4, rel=1e-6)
    with pytest.raises(ValueError, match=r"targets\.shifted"):
        sparse_kl(s[:, :-1], targets)
    with pytest.raises(ValueError, match="tail must be"):
        sparse_kl(s, targets, tail="spread")
    with pytest.raises(ValueError, match="TopKTargets"):
        TopKTargets(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(3))


# ------------------------------------------------------------------------------------------ fingerprints
def test_store_refuses_another_teacher_other_data_and_other_k(store) -> None:
    path, teacher, data = store
    TeacherLogitStore(path, teacher=teacher, dataset=data, k=5, vocab_size=V)  # matches
    assert TeacherLogitStore(path).fingerprint["teacher"] == teacher_fingerprint(teacher)
    with pytest.raises(KDConfigError, match=r"teacher fingerprint .* differs"):
        TeacherLogitStore(path, teacher=tiny_teacher(seed=1))
    with pytest.raises(KDConfigError, match=r"data fingerprint .* differs"):
        TeacherLogitStore(path, dataset=sequences(seed=1))
    assert data_fingerprint(sequences(seed=0)) == data_fingerprint(data)
    with pytest.raises(KDConfigError, match="k=8 but the store keeps k=5"):
        TeacherLogitStore(path, k=8)
    with pytest.raises(KDConfigError, match="fingerprint abc differs"):
        TeacherLogitStore(path, fingerprint="abc")


def test_store_refuses_batches_it_was_not_written_for(store) -> None:
    path, _, data = store
    reader = TeacherLogitStore(path)
    batch = collate_token_batch([data[0], data[2]], pad_token_id=0)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 0] = (changed["input_ids"][0, 0] + 1) % V
    with pytest.raises(KDConfigError, match="tokens differ"):
        reader.targets(changed)
    with pytest.raises(KDConfigError, match="sequence 2 has 5 real tokens in the batch but 12 in the store"):
        reader.targets(dict(batch, sample_index=torch.tensor([2, 2])))
    with pytest.raises(KDConfigError, match="sample_index 6 is outside"):
        reader.targets(dict(batch, sample_index=torch.tensor([6, 0])))
    with pytest.raises(KDConfigError, match="no 'sample_index'"):
        reader.targets({k: v for k, v in batch.items() if k != "sample_index"})


def test_missing_or_existing_folders(tmp_path: Path, store) -> None:
    path, teacher, data = store
    with pytest.raises(KDConfigError, match="no teacher-logit store"):
        TeacherLogitStore(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_teacher_logits(teacher, data, path, k=5)
    with pytest.raises(KDConfigError, match="--k must be in \\[1, 24\\]"):
        write_teacher_logits(teacher, data, tmp_path / "big", k=V + 1)
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".big.tmp-*"))
    (path / "indices.npy").unlink()
    with pytest.raises(KDConfigError, match="incomplete"):
        TeacherLogitStore(path)


# ---------------------------------------------------------------------------------------------- command
def test_command_on_a_tiny_gpt_teacher_and_tiny_text(in_tmp: Path) -> None:
    docs = in_tmp / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * (3 + i))
    teacher_args = {"vocab_size": 264, "d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 32}
    torch.manual_seed(0)
    torch.save(TinyGPT(**teacher_args).state_dict(), in_tmp / "teacher.pt")
    gpt = {"class_path": "kd_lightning.models.lm.TinyGPT", "init_args": teacher_args}
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 1},
        "data": {
            "class_path": "kd_lightning.data.text.TextDataModule",
            "init_args": {"paths": str(docs), "block_size": 32, "batch_size": 4, "val_fraction": 0.2},
        },
        "model": {
            "class_path": "kd_lightning.methods.vanilla_kd.VanillaKD",
            "init_args": {"student": gpt, "teacher": gpt, "teacher_ckpt": "teacher.pt"},
        },
    }
    (in_tmp / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    from kd_lightning.commands import main as kd_main

    kd_main(["lm-teacher-logits", "--config", "config.yaml", "--out", "store", "--k", "8", "--device", "cpu"])
    header = json.loads((in_tmp / "store" / "header.json").read_text())
    assert header["k"] == 8 and header["vocab_size"] == 264 and header["split"] == "train"
    assert header["teacher_ckpt"] == "teacher.pt" and header["data_config"]["init_args"]["block_size"] == 32

    from kd_lightning.data.text import TextDataModule

    dm = TextDataModule(paths=str(docs), block_size=32, batch_size=4, val_fraction=0.2)
    dm.setup("fit")
    teacher = TinyGPT(**teacher_args)
    teacher.load_state_dict(torch.load(in_tmp / "teacher.pt"))
    reader = TeacherLogitStore(in_tmp / "store", teacher=teacher, dataset=dm.train_set)
    batch = next(iter(dm.train_dataloader()))
    targets = reader.targets(batch)
    with torch.no_grad():
        exact = topk_targets(teacher(batch["input_ids"], batch["attention_mask"]), 8)
    real = batch["attention_mask"]
    assert torch.allclose(targets.logprobs[real], exact.logprobs[real], atol=5e-3)

    # The validation split with a dotted override, and a config without teacher weights.
    main(["--config", "config.yaml", "--out", "val", "--split", "val", "--k", "4", "--data.init_args.block_size=16"])
    assert json.loads((in_tmp / "val" / "header.json").read_text())["data_config"]["init_args"]["block_size"] == 16
    config["model"]["init_args"]["teacher_ckpt"] = None
    (in_tmp / "config.yaml").write_text(json.dumps(config))
    with pytest.raises(KDConfigError, match="no teacher weights"):
        main(["--config", "config.yaml", "--out", "none"])
    main(["--config", "config.yaml", "--out", "given", "--teacher_ckpt", "teacher.pt", "--k", "2"])
    assert TeacherLogitStore(in_tmp / "given", teacher=teacher).k == 2
