"""Vocabulary mapping by token strings (exact_tokens): normalisation, the map, projected teacher logits."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.divergences import forward_kl, reverse_kl
from kd_lightning.losses.vocab_map import (
    EXCLUDED_LOGIT,
    build_vocab_map,
    map_input_ids,
    normalize_token,
    project_teacher_logits,
    restrict_logits,
)

STUDENT = {"<s>": 0, "</s>": 1, "a": 2, "Ġb": 3, "Ġc": 4, "Ċ": 5}  # byte-level (GPT-2 style)
TEACHER = {"<unk>": 0, "<|end|>": 1, "▁b": 2, "a": 3, "<0x0A>": 4, "▁d": 5, "<s>": 6}  # SentencePiece style


def hand_map():
    return build_vocab_map(
        STUDENT,
        TEACHER,
        student_scheme="byte_level",
        teacher_scheme="metaspace",
        student_special={"<s>": 0, "</s>": 1},
        teacher_special={"<unk>": 0, "<|end|>": 1, "<s>": 6},
        student_roles={"bos": 0, "eos": 1, "pad": None, "unk": None},
        teacher_roles={"bos": 6, "eos": 1, "pad": None, "unk": 0},
        num_student_rows=8,
    )


def test_token_strings_normalise_to_the_bytes_they_stand_for() -> None:
    assert normalize_token("Ġhello", "byte_level") == b" hello"
    assert normalize_token("Ċ", "byte_level") == b"\n"
    assert normalize_token("Ã©", "byte_level") == "é".encode()  # GPT-2 writes é's two bytes as Ã and ©
    assert normalize_token("▁hello", "metaspace") == b" hello"
    assert normalize_token("<0x0A>", "metaspace") == b"\n"
    assert normalize_token("Ġhello", "plain") == "Ġhello".encode()
    with pytest.raises(KDConfigError, match="scheme"):
        normalize_token("a", "wordpiece")


def test_map_matches_strings_specials_and_roles_by_hand() -> None:
    vocab_map = hand_map()
    # <s> by string (and role), </s> -> <|end|> by the eos role, a, Ġb=▁b, Ġc none, Ċ=<0x0A>, 2 padding rows
    assert vocab_map.student_to_teacher.tolist() == [6, 1, 3, 2, -1, 4, -1, -1]
    assert vocab_map.student_size == 6 and vocab_map.teacher_size == 7
    assert math.isclose(vocab_map.student_coverage, 5 / 6)
    assert math.isclose(vocab_map.teacher_coverage, 5 / 7)
    assert vocab_map.unmapped_examples == ["Ġc"]
    with pytest.raises(KDConfigError, match="num_student_rows"):
        build_vocab_map(STUDENT, TEACHER, num_student_rows=3)


def test_projected_teacher_is_the_renormalised_teacher_on_mapped_ids() -> None:
    index = hand_map().student_to_teacher
    teacher = torch.arange(7.0).reshape(1, 7).requires_grad_(True)
    projected = project_teacher_logits(teacher, index)
    f = EXCLUDED_LOGIT
    assert projected.tolist() == [[6.0, 1.0, 3.0, 2.0, f, 4.0, f, f]]
    probs = projected.softmax(-1)[0]
    kept = torch.tensor([6.0, 1.0, 3.0, 2.0, 4.0]).exp()
    expected = torch.zeros(8)
    expected[[0, 1, 2, 3, 5]] = kept / kept.sum()  # teacher mass on <unk> (0) and ▁d (5) dropped, rest renormalised
    torch.testing.assert_close(probs, expected)
    projected.sum().backward()  # a gather: each mapped teacher logit gets gradient 1, the dropped ones 0
    assert teacher.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]]
    with pytest.raises(KDConfigError, match="maps to teacher id 6"):
        project_teacher_logits(torch.zeros(1, 5), index)


def test_divergences_stay_finite_and_renormalising_the_student_excludes_unmapped_ids() -> None:
    index = hand_map().student_to_teacher
    torch.manual_seed(0)
    teacher = project_teacher_logits(torch.randn(3, 7), index)
    student = torch.randn(3, 8, requires_grad=True)
    fkl = forward_kl(student, teacher, temperature=0.5)
    assert torch.isfinite(fkl)
    fkl.backward()
    assert torch.isfinite(student.grad).all()
    mapped = index >= 0
    restricted = restrict_logits(student, mapped)
    rkl = reverse_kl(restricted, teacher)
    assert torch.isfinite(rkl) and rkl < 10  # without the restriction the student's unmapped mass costs ~1e4
    assert reverse_kl(student, teacher) > 100
    student.grad = None
    rkl.backward()
    assert (student.grad[:, ~mapped] == 0).all() and (student.grad[:, mapped] != 0).any()
    # Identical distributions over the mapped ids: zero divergence both ways.
    same = restrict_logits(teacher.clone(), mapped)
    assert forward_kl(same, teacher).abs() < 1e-6 and reverse_kl(same, teacher).abs() < 1e-6


def test_student_ids_translate_to_teacher_ids() -> None:
    index = hand_map().student_to_teacher
    ids = torch.tensor([[0, 2, 3, 4, 5, 1]])
    assert map_input_ids(ids, index, unmapped_id=0).tolist() == [[6, 3, 2, 0, 4, 1]]
