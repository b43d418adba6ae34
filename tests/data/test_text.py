"""TextDataModule: byte tokenizer, packing, prompt masking, document splits, stable ids, accumulation counts."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, DistributedSampler

from kd_lightning.data.text import (
    STDLIB_EXCLUDE,
    ByteTokenizer,
    TextDataModule,
    TokenBatchLoader,
    left_pad_prompts,
    stdlib_files,
)
from kd_lightning.errors import DatasetNotFoundError, KDConfigError

BOS, EOS, PAD = 257, 258, 256


def write_docs(folder: Path, n: int = 10, size: int = 50) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        text = f"doc{i:02d}:" + "abcdefghij"[i % 10] * (size + i)
        (folder / f"doc{i:02d}.txt").write_text(text)
        texts.append(text)
    return texts


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def batches(loader) -> list[dict[str, torch.Tensor]]:
    return list(iter(loader))


# ---------------------------------------------------------------------------------------- tokenizer
def test_byte_tokenizer_round_trip_and_vocabulary() -> None:
    tok = ByteTokenizer()
    text = "déjà vu ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert torch.equal(tok.encode_tensor(text), torch.tensor(ids))
    assert tok.decode([BOS, *ids, EOS]) == text
    assert tok.decode([BOS, 104, 105, EOS], skip_special_tokens=False) == "<bos>hi<eos>"
    assert (len(tok), tok.vocab_size, ByteTokenizer(multiple_of=1).vocab_size) == (259, 264, 259)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)


# ------------------------------------------------------------------------------------------ packing
def test_plain_text_is_packed_into_blocks_of_whole_documents(tmp_path: Path) -> None:
    texts = write_docs(tmp_path / "corpus")
    dm = TextDataModule(root=str(tmp_path), paths="corpus", block_size=16, batch_size=4, val_fraction=0.2)
    dm.setup("fit")
    assert dm.num_classes == 264 and dm.input_shape == (16,)
    train_docs = [texts[i] for i in range(10) if f"doc{i:02d}" in dm.tokenizer.decode(dm.train_set.tokens)]
    stream = [t for doc in train_docs for t in [BOS, *doc.encode(), EOS]]
    assert dm.train_set.tokens.tolist() == stream  # documents in order, each between BOS and EOS
    n = len(stream)
    assert len(dm.train_set) == -(-n // 16) - (1 if n % 16 == 1 else 0)
    loader = dm.val_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "sample_index", "prompt_lengths"}
    real = batch["attention_mask"]
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])  # every real token is predicted
    assert (batch["labels"][~real] == -100).all() and (batch["input_ids"][~real] == PAD).all()
    last = dm.val_set[len(dm.val_set) - 1]["input_ids"]
    assert 2 <= len(last) <= 16  # the last block is shorter, padded in its batch


def test_documents_are_split_whole_and_reproducibly(tmp_path: Path) -> None:
    write_docs(tmp_path / "corpus", n=20)

    def split_names(seed: int) -> list[set[str]]:
        dm = TextDataModule(root=str(tmp_path), paths="corpus/*.txt", split_seed=seed, block_size=8)
        dm.setup()
        out = []
        for ds in (dm.train_set, dm.val_set, dm.test_set):
            text = dm.tokenizer.decode(ds.tokens)
            out.append({f"doc{i:02d}" for i in range(20) if f"doc{i:02d}" in text})
        return out

    first = split_names(0)
    assert [len(s) for s in first] == [16, 2, 2]
    assert not (first[0] & first[1]) and not (first[0] & first[2]) and not (first[1] & first[2])
    assert split_names(0) == first
    assert split_names(1) != first


def test_sample_index_is_a_stable_id_under_shuffling(tmp_path: Path) -> None:
    write_docs(tmp_path / "corpus")
    dm = TextDataModule(root=str(tmp_path), paths=["corpus"], block_size=8, batch_size=3)
    dm.setup()
    for batch in batches(dm.train_dataloader()):
        for row, index in enumerate(batch["sample_index"].tolist()):
            ids = dm.train_set[index]["input_ids"]
            assert torch.equal(batch["input_ids"][row, : len(ids)], ids)


# -------------------------------------------------------------------------------------------- JSONL
def test_jsonl_prompt_masking_and_configurable_keys(tmp_path: Path) -> None:
    records = [{"q": f"question {i}?", "a": f"answer {i}", "other": 1} for i in range(6)]
    write_jsonl(tmp_path / "qa.jsonl", records)
    dm = TextDataModule(
        root=str(tmp_path),
        paths="qa.jsonl",
        data_format="jsonl",
        prompt_key="q",
        response_key="a",
        block_size=64,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        p = int(batch["prompt_lengths"][row])
        text = dm.tokenizer.decode(ids[batch["attention_mask"][row]])
        prompt, response = text.split("?")
        assert p == 1 + len(prompt) + 1  # BOS + "question i?"
        assert (labels[:p] == -100).all()
        n = int(batch["attention_mask"][row].sum())
        assert labels[p:n].tolist() == [*response.encode(), EOS]
        assert (labels[n:] == -100).all()
    unmasked = TextDataModule(
        root=str(tmp_path), paths="qa.jsonl", data_format="jsonl", prompt_key="q", response_key="a", mask_prompt=False
    )
    unmasked.setup()
    assert int(unmasked.train_set.prompt_lengths.sum()) == 0


def test_jsonl_truncation_drops_records_without_a_response_token(tmp_path: Path) -> None:
    records = [{"prompt": "x" * 40, "response": "y"}] + [{"prompt": "p", "response": "r" * 5} for _ in range(9)]
    write_jsonl(tmp_path / "d" / "a.jsonl", records)
    dm = TextDataModule(root=str(tmp_path), paths="d", data_format="jsonl", block_size=16)
    with pytest.warns(UserWarning, match="1 of 10 train records have no token to predict"):
        sequences = dm._build(dm.documents(), "train")  # all records as one split
    assert len(sequences) == 9 and sequences.lengths.max() <= 16


def test_jsonl_errors_name_the_line_and_field(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}])
    dm = TextDataModule(root=str(tmp_path), paths="bad.jsonl", data_format="jsonl")
    with pytest.raises(KDConfigError, match=r"bad.jsonl:2 has no field 'response'"):
        dm.setup()


def test_prompts_can_be_left_padded_for_generation() -> None:
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool),
        "prompt_lengths": torch.tensor([3, 1]),
    }
    ids, mask = left_pad_prompts(batch, pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 6]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    ids, _ = left_pad_prompts(batch, pad_token_id=9, prompt_length=4)
    assert ids.tolist() == [[1, 2, 3, 4], [9, 6, 7, 8]]
    with pytest.raises(ValueError, match="prompt_length"):
        left_pad_prompts({**batch, "prompt_lengths": torch.tensor([0, 0])}, pad_token_id=9)


# ------------------------------------------------------------------------------ accumulation counts
def group_counts(batches_: list[dict], k: int, used: int | None = None) -> list[int]:
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches_]
    used = len(counts) if used is None else used
    out = []
    for start in range(0, len(counts), k):
        end = min(start + k, used) if start < used else start + k
        out += [sum(counts[start:end])] * len(counts[start:end])
    return out


@pytest.fixture
def jsonl_dm(tmp_path: Path) -> TextDataModule:
    records = [{"prompt": "p" * (i % 4 + 1), "response": "r" * (i % 7 + 1)} for i in range(40)]
    write_jsonl(tmp_path / "qa.jsonl", records)
    dm = TextDataModule(root=str(tmp_path), paths="qa.jsonl", data_format="jsonl", batch_size=3, val_fraction=0.1)
    dm.setup()
    return dm


def test_num_items_in_batch_counts_the_accumulation_group(jsonl_dm: TextDataModule) -> None:
    assert all(b["num_items_in_batch"] == group_counts([b], 1)[0] for b in batches(jsonl_dm.train_dataloader()))
    jsonl_dm.accumulate_grad_batches = 4
    got = batches(jsonl_dm.train_dataloader())
    assert len(got) == 11  # 32 sequences in batches of 3: groups of 4, 4 and a last group of 3
    assert [int(b["num_items_in_batch"]) for b in got] == group_counts(got, 4)
    assert len({int(b["num_items_in_batch"]) for b in got[:4]}) == 1
    # Lightning's limit_train_batches ends the epoch early: the last group stops there too
    loader = jsonl_dm.train_dataloader()
    loader.limit_batches = 6
    got = batches(loader)
    assert [int(b["num_items_in_batch"]) for b in got[:6]] == group_counts(got[:6], 4)


def test_counts_stay_per_rank_when_lightning_injects_a_distributed_sampler(jsonl_dm: TextDataModule) -> None:
    jsonl_dm.accumulate_grad_batches = 2
    plain = jsonl_dm.train_dataloader()
    with _replace_dunder_methods(DataLoader, "dataset"):  # how Lightning calls the hook: arguments recorded
        recorded = jsonl_dm.train_dataloader()
    seen = []
    for rank, loader in ((0, plain), (1, recorded)):
        sampler = DistributedSampler(jsonl_dm.train_set, num_replicas=2, rank=rank, shuffle=True, seed=0)
        shard = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        assert isinstance(shard, TokenBatchLoader) and shard.accumulate_grad_batches == 2
        got = batches(shard)
        assert len(got) == 6  # 16 sequences per rank in batches of 3
        assert [int(b["num_items_in_batch"]) for b in got] == group_counts(got, 2)
        seen += [i for b in got for i in b["sample_index"].tolist()]
    assert sorted(seen) == list(range(len(jsonl_dm.train_set)))


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.records: list[tuple[int, int, int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        valid = int((batch["labels"][:, 1:] != -100).sum())
        self.records.append((batch_idx, valid, int(batch["num_items_in_batch"])))
        return self.weight * 0.0 + self.weight.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_groups_follow_the_trainers_accumulation_and_limit(jsonl_dm: TextDataModule, tmp_path: Path) -> None:
    module = _Recorder()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=3,
        limit_train_batches=5,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=jsonl_dm)  # the data module reads k = 3 from the trainer
    assert [r[0] for r in module.records] == [0, 1, 2, 3, 4]
    valid = [r[1] for r in module.records]
    expected = [sum(valid[:3])] * 3 + [sum(valid[3:5])] * 2  # the last group is cut by the limit
    assert [r[2] for r in module.records] == expected


# ------------------------------------------------------------------------------------------- stdlib
def test_stdlib_source_is_deterministic_and_limited() -> None:
    root, files = stdlib_files()
    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative) and "os.py" in relative
    assert not any(r.startswith(("site-packages/", "test/")) or "/test/" in r for r in relative)
    dm = TextDataModule(source="stdlib", max_files=6, block_size=32, val_fraction=0.2, test_fraction=0.2)
    _, chosen = dm.files()
    assert len(chosen) == 6 and chosen == dm.files()[1]
    assert TextDataModule(source="stdlib", max_files=6, split_seed=1).files()[1] != chosen
    small = TextDataModule(source="stdlib", max_bytes=60_000, block_size=32)
    assert sum(p.stat().st_size for p in small.files()[1]) <= 60_000
    identity = dm.data_identity()
    assert identity["files"] == 6 and identity == dm.data_identity() and "python" in identity
    dm.setup()
    assert len(dm.train_set) > 0 and STDLIB_EXCLUDE[0] == "site-packages/*"


# ---------------------------------------------------------------------------------------- HF tokenizer
def test_hugging_face_tokenizer_from_a_local_folder(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = write_docs(tmp_path / "corpus", n=6, size=3)
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )
    fast.save_pretrained(tmp_path / "tok")
    dm = TextDataModule(
        root=str(tmp_path), paths="corpus", tokenizer=str(tmp_path / "tok"), local_files_only=True, block_size=8
    )
    assert dm.num_classes == len(fast)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert dm.train_set[0]["input_ids"][0].item() == fast.bos_token_id
    assert dm.train_set.tokens.tolist().count(fast.eos_token_id) == len(dm.documents()) - 2  # val and test docs
    assert int(batch["input_ids"].max()) < dm.num_classes
    assert (
        TextDataModule(root=str(tmp_path), paths="corpus", tokenizer=str(tmp_path / "tok"), vocab_size=64).num_classes
        == 64
    )


# ------------------------------------------------------------------------------------------- errors
def test_clear_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match="paths is empty"):
        TextDataModule()
    with pytest.raises(TypeError, match="val_split"):
        TextDataModule(paths="x", val_split=0.1)
    with pytest.raises(KDConfigError, match="data_format must be 'text'"):
        TextDataModule(source="stdlib", data_format="jsonl")
    with pytest.raises(DatasetNotFoundError, match="missing"):
        TextDataModule(root=str(tmp_path), paths="missing").setup()
    write_docs(tmp_path / "two", n=2)
    with pytest.raises(KDConfigError, match="2 documents are too few"):
        TextDataModule(root=str(tmp_path), paths="two").setup()
    with pytest.raises(KDConfigError, match="smaller than the tokenizer"):
        _ = TextDataModule(paths="x", vocab_size=100).num_classes
