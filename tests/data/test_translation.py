"""TranslationDataModule: the generated grammar's reordering and agreement, splits, parallel text, tokenizer."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data.translation import (
    ADJ_ENDINGS,
    ADJECTIVES,
    ARTICLES,
    NOUNS,
    PREPOSITIONS,
    VERB_ENDINGS,
    VERBS,
    TranslationDataModule,
    WordTokenizer,
    generate_pairs,
    read_parallel_text,
)
from kd_lightning.errors import KDConfigError

# Reverse lexicon of the target language: word -> (kind, (gender, plural) or None).
TARGET: dict[str, tuple[str, tuple[str, bool] | None]] = {}
for _det, _forms in ARTICLES.items():
    for _gn, _word in _forms.items():
        TARGET[_word] = ("det", _gn)
for _stem, _gender in NOUNS.values():
    TARGET[_stem] = ("noun", (_gender, False))
    TARGET[_stem + "en"] = ("noun", (_gender, True))
for _stem in ADJECTIVES.values():
    for _gn, _end in ADJ_ENDINGS.items():
        TARGET[_stem + _end] = ("adj", _gn)
for _stem in VERBS.values():
    for _gn, _end in VERB_ENDINGS.items():
        TARGET[_stem + _end] = ("verb", _gn)
for _post in PREPOSITIONS.values():
    TARGET[_post] = ("post", None)
TARGET["ke"] = ("rel", None)
SOURCE_ADJ, SOURCE_DET, SOURCE_PREP = set(ADJECTIVES), set(ARTICLES), set(PREPOSITIONS)


def kinds(sentence: str) -> list[tuple[str, tuple[str, bool] | None]]:
    return [TARGET[w] for w in sentence.split()]


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs((300, 50, 50), seed=3, relative_prob=0.3, pp_prob=0.3)


def test_target_words_agree_and_are_reordered(pairs) -> None:
    checked_relative = 0
    for pair in [p for split in pairs for p in split]:
        target = kinds(pair.target)
        # SOV: the main verb ends the target and agrees with the subject noun (right after the first article)
        assert target[-1][0] == "verb" and target[0][0] == "det" and target[1][0] == "noun"
        assert target[-1][1] == target[1][1], pair
        for i, (kind, gn) in enumerate(target):
            if kind == "det":  # article before its noun, same gender and number (no adjective in between)
                assert target[i + 1][0] == "noun" and target[i + 1][1] == gn, pair
            if kind == "adj":  # adjectives follow their noun and agree with it
                j = i - 1
                while target[j][0] == "adj":
                    j -= 1
                assert target[j][0] == "noun" and target[j][1] == gn, pair
            if kind == "post":  # postpositions follow their noun phrase
                assert target[i - 1][0] in ("noun", "adj"), pair
            if kind == "rel":  # relative-clause verb: first verb after "ke", agreeing with the head noun
                j = i - 1
                while target[j][0] == "adj":
                    j -= 1
                verb = next(k for k in target[i + 1 :] if k[0] == "verb")
                assert target[j][0] == "noun" and verb[1] == target[j][1], pair
                checked_relative += 1
        source = pair.source.split()
        # source: adjectives only after a determiner or an adjective (before the noun); prepositions before NPs
        for i, word in enumerate(source):
            if word in SOURCE_ADJ:
                assert source[i - 1] in SOURCE_DET | SOURCE_ADJ, pair
            if word in SOURCE_PREP:
                assert source[i + 1] in SOURCE_DET, pair
        # the source verb is followed by the object (SVO); it is never last
        assert source[-1] not in {v for v in VERBS} | {v + "s" for v in VERBS}
    assert checked_relative > 20


def test_generation_is_deterministic_and_splits_are_disjoint(pairs) -> None:
    again = generate_pairs((300, 50, 50), seed=3, relative_prob=0.3, pp_prob=0.3)
    assert again == pairs
    assert generate_pairs((300, 50, 50), seed=4, relative_prob=0.3, pp_prob=0.3) != pairs
    sources = [{p.source for p in split} for split in pairs]
    assert [len(s) for s in sources] == [300, 50, 50]  # no repeat inside a split
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])


def test_tiny_grammar_cannot_fill_the_splits() -> None:
    with pytest.raises(KDConfigError, match="distinct sentences"):
        generate_pairs(
            (9000, 1, 1), 0, adjective_prob=0.0, pp_prob=0.0, relative_prob=0.0, plural_prob=0.0, max_misses=2000
        )


def test_batches_of_the_generated_data() -> None:
    dm = TranslationDataModule(num_train=40, num_val=8, num_test=8, batch_size=8, max_vocab=200)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert tok.vocab_size == dm.vocab_size == 200
    mask, labels = batch["decoder_attention_mask"], batch["labels"]
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert torch.equal(mask, labels != -100)
    assert int(batch["num_items_in_batch"]) == int(mask.sum())
    for row in range(labels.shape[0]):
        n = int(mask[row].sum())
        assert batch["decoder_input_ids"][row, 0] == tok.bos_token_id
        assert torch.equal(batch["decoder_input_ids"][row, 1:n], labels[row, : n - 1])  # teacher forcing: shifted
        assert labels[row, n - 1] == tok.eos_token_id
        assert tok.decode(labels[row, :n]) == batch["references"][row]
        src_len = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, src_len - 1] == tok.eos_token_id
        assert tok.decode(batch["input_ids"][row]) == batch["sources"][row]


def test_tokenizer_round_trip_unknown_words_and_fingerprint(tmp_path) -> None:
    tok = WordTokenizer.build(["the dog sees the cat .", "lo kanu la gata videk"], max_vocab=12)
    assert tok.vocab_size == len(tok) == 12
    assert tok.words[0] == "the"  # the most frequent word first
    assert len(tok.words) == 8  # 12 ids - 4 specials: the rarest words (alphabetically last) are cut
    text = "the dog sees the cat."
    assert tok.tokenize(text) == ["the", "dog", "sees", "the", "cat", "."]
    kept = [w for w in tok.tokenize(text) if w in tok.words]
    assert tok.decode(tok.encode(text)) == " ".join(kept)
    assert tok.encode("zebra") == [tok.unk_token_id]
    assert tok.decode([tok.bos_token_id, tok.encode("dog")[0], tok.eos_token_id, tok.encode("cat")[0]]) == "dog"
    loaded = WordTokenizer.load(tok.save(tmp_path / "tokenizer.json"))
    assert loaded.id_to_token == tok.id_to_token and loaded.identity == tok.identity
    other = WordTokenizer.build(["the dog sees the bird ."], max_vocab=12)
    assert other.identity.fingerprint != tok.identity.fingerprint


def _write(folder, split, src_lines, tgt_lines) -> None:
    (folder / f"{split}.de").write_text("\n".join(src_lines) + "\n", encoding="utf-8")
    (folder / f"{split}.en").write_text("\n".join(tgt_lines) + "\n", encoding="utf-8")


def test_parallel_text_files(tmp_path) -> None:
    for split in ("train", "val", "test"):
        _write(
            tmp_path, split, ["der Hund sieht die Katze .", "  ", "ein Haus"], ["the dog sees the cat .", "", "a house"]
        )
    pairs = read_parallel_text(tmp_path, "train", "de", "en")
    assert [(p.source, p.target) for p in pairs] == [
        ("der Hund sieht die Katze .", "the dog sees the cat ."),
        ("ein Haus", "a house"),
    ]
    dm = TranslationDataModule(format="parallel_text", root=str(tmp_path), src_lang="de", tgt_lang="en", batch_size=2)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["references"] == ["the dog sees the cat .", "a house"]
    assert batch["sources"][1] == "ein Haus"


def test_parallel_text_errors(tmp_path) -> None:
    _write(tmp_path, "train", ["a", "b", "c"], ["x", "y"])
    with pytest.raises(KDConfigError) as err:
        read_parallel_text(tmp_path, "train", "de", "en")
    message = str(err.value)
    assert "train.de" in message and "3 lines" in message and "train.en has 2" in message and "\n" not in message
    with pytest.raises(KDConfigError, match=r"no file .*val\.de.*format: generated"):
        read_parallel_text(tmp_path, "val", "de", "en")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_train": 0}, "data.init_args.num_train"),
        ({"format": "tsv"}, "data.init_args.format"),
        ({"max_vocab": 3}, "data.init_args.max_vocab"),
        ({"src_lang": "en", "tgt_lang": "en"}, "data.init_args.src_lang"),
        ({"pp_prob": 0.9, "relative_prob": 0.5}, "data.init_args.relative_prob"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field) -> None:
    with pytest.raises(KDConfigError, match=field):
        TranslationDataModule(**kwargs)
