"""``kd search-student``: training-free search of the student architecture that will distil best (DisWOT).

DisWOT (Dong, Li & Wei, CVPR 2023): a randomly initialised teacher and each candidate student see one mini-batch;
the candidate is scored by how similar its classifier-gradient channel correlations (semantic similarity) and its
pre-pooling sample Gram matrix (relation similarity) are to the teacher's; regularised evolution under a
parameter/FLOPs budget finds the best-scoring candidate; ``kd fit`` then distils it. The scores, spaces and the
evolution are :mod:`kd_lightning.models.search` (see there for the formulas and the fixed tournament bug).

    kd search-student --config configs/search/digits_diswot.yaml
    kd search-student --config configs/search/digits_diswot.yaml --budget.max_params=5000 --evolution.cycles=200
    kd search-student --config configs/search/digits_diswot.yaml --fit -- --trainer.max_epochs=60
    kd search-student --config configs/search/digits_diswot.yaml \
        --score-grid benchmarks/grids/digits_diswot_students.yaml

The search config (YAML; every field can be overridden as ``--<section>.<field>=<value>``)::

    base_config: ../digits_kd.yaml    # a kd fit config (relative to this file): teacher, data, and the KD recipe
    base_args: []                     # overrides of the base config (kd fit flags)
    teacher_ckpt: null                # null: the teacher's random initial weights (the paper); or a checkpoint
    out: runs/search/digits_diswot    # output folder (relative to the working folder)
    score: {seed: 0, teacher_seed: 1, batches: 1, semantic_weight: 1.0, relation_weight: 1.0,
            semantic_mode: auto, baselines: true}
    space: {kind: smallcnn, widths: [4, 8, 16, 32, 64], depths: [1, 2, 3], in_channels: 1, image_size: 8}
    budget: {max_params: 20000, max_flops: null}
    evolution: {population: 36, sample_size: 8, cycles: 100, parent_selection: best, seed: 0, max_tries: 1000}

Space kinds: ``smallcnn`` (SmallCNN widths/depth), ``cifar_resnet`` (CIFAR-zoo ResNet depth/widths, 3x32x32 inputs),
``nb201`` (NAS-Bench-201 cells: ops, channels, cells_per_stage, in_channels, image_size).

Outputs in ``out``: ``ranking.csv`` and ``ranking.json`` (every distinct candidate evaluated, best first: DisWOT
score, its semantic and relation terms, parameters, FLOPs, the NASWOT and Zen baselines, the student config; the
JSON adds the settings and the evaluation history), ``winner_student.yaml`` (the student as a ``class_path`` config:
``kd fit --config BASE --model.init_args.student winner_student.yaml``) and ``winner_fit.yaml`` (the base config,
fully resolved, with the student replaced: ``kd fit --config winner_fit.yaml``). ``--fit`` runs that fit at once;
arguments after ``--`` go to it.

``--score-grid GRID.yaml`` scores instead the student of every run of a ``kd bench`` grid (as ``kd fit`` would build
it) and writes ``scores.csv`` / ``scores.json`` in ``out``: with the grid's ``results.csv``,
``benchmarks/diswot_correlation.py`` gives the rank correlation of each score with the distilled accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kd_lightning.errors import KDConfigError

__all__ = ["DEFAULTS", "build_parser", "load_search_config", "main"]

#: every section and field of a search config, with its default
DEFAULTS: dict[str, Any] = {
    "base_config": None,
    "base_args": [],
    "teacher_ckpt": None,
    "out": "runs/search/diswot",
    "score": {
        "seed": 0,
        "teacher_seed": 1,
        "batches": 1,
        "semantic_weight": 1.0,
        "relation_weight": 1.0,
        "semantic_mode": "auto",
        "baselines": True,
        "teacher_classifier": "fc",
        "teacher_feature": None,
        "student_classifier": "fc",
        "student_feature": None,
        "zen_batch_size": 16,
    },
    "space": {"kind": "smallcnn"},
    "budget": {"max_params": None, "max_flops": None},
    "evolution": {
        "population": 36,
        "sample_size": 8,
        "cycles": 100,
        "parent_selection": "best",
        "seed": 0,
        "max_tries": 1000,
        "official_top_n": 5,
    },
}
_OPEN_SECTIONS = ("space",)  # checked by the space itself
RANKING_FIELDS = (
    "rank",
    "label",
    "score",
    "semantic",
    "relation",
    "semantic_mode",
    "params",
    "flops",
    "naswot",
    "zen",
    "born",
    "arch",
    "student",
)


# ---------------------------------------------------------------------------------------------- the config
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd search-student",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", required=True, help="the search config (YAML), e.g. configs/search/digits_diswot.yaml"
    )
    parser.add_argument("--out", default=None, help="output folder (default: the config's out)")
    parser.add_argument("--score-grid", default=None, help="score the students of a kd bench grid instead of searching")
    parser.add_argument(
        "--fit", action="store_true", help="after the search, kd fit the winner (args after -- go to it)"
    )
    return parser


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(config: dict[str, Any], items: Sequence[str]) -> None:
    """Apply ``--section.field=value`` (or ``--section.field value``) overrides; values are read as YAML.

    Raises:
        KDConfigError: naming an item that is not ``--<section>.<field>`` of a search config.
    """
    i = 0
    items = list(items)
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) < 3:
            raise KDConfigError(item, "is not an option of kd search-student", "see kd search-student --help")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise KDConfigError(item, "needs a value", f"write {item}=VALUE")
            value = items[i + 1]
            i += 1
        i += 1
        path = key.replace("-", "_").split(".")
        if path[0] not in DEFAULTS:
            raise KDConfigError(
                item.split("=")[0], "is not an option of kd search-student", f"sections: {', '.join(DEFAULTS)}"
            )
        target = config
        for part in path[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[path[-1]] = _parse_value(value)


def load_search_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The search config at ``path`` with ``overrides`` applied and the defaults filled in; ``base_config`` is made
    absolute (relative to the config's folder).

    Raises:
        KDConfigError: a missing file, invalid YAML, an unknown section or field.
    """
    path = Path(path)
    if not path.is_file():
        raise KDConfigError("config", f"no file at {path.resolve()}", "check the path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise KDConfigError("config", f"{path} is not valid YAML ({err})", "fix the syntax") from None
    if not isinstance(raw, dict):
        raise KDConfigError("config", f"{path} is not a YAML mapping", "see kd search-student --help")
    apply_overrides(raw, overrides)
    config: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        value = raw.pop(key, None)
        if isinstance(default, dict):
            if value is not None and not isinstance(value, dict):
                raise KDConfigError(key, f"must be a mapping, got {value!r}", "see kd search-student --help")
            merged = dict(default)
            for field, field_value in (value or {}).items():
                if key not in _OPEN_SECTIONS and field not in default:
                    raise KDConfigError(f"{key}.{field}", "unknown field", f"the fields of {key}: {', '.join(default)}")
                merged[field] = field_value
            config[key] = merged
        else:
            config[key] = default if value is None else value
    if raw:
        unknown = sorted(raw)[0]
        raise KDConfigError(unknown, "unknown field of a search config", f"the fields: {', '.join(DEFAULTS)}")
    if not config["base_config"]:
        raise KDConfigError(
            "base_config",
            "is missing",
            "name the kd fit config of the teacher, data and recipe, e.g. ../digits_kd.yaml",
        )
    base = Path(config["base_config"]).expanduser()
    config["base_config"] = str(base if base.is_absolute() else (path.parent / base).resolve())
    if not Path(config["base_config"]).is_file():
        raise KDConfigError(
            "base_config", f"no file at {config['base_config']}", "a path relative to the search config"
        )
    if isinstance(config["base_args"], str) or not isinstance(config["base_args"], list):
        raise KDConfigError("base_args", f"must be a list of kd fit flags, got {config['base_args']!r}", "")
    return config


# ---------------------------------------------------------------------------------------------- building blocks
def _as_dict(value: Any) -> Any:
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        return {k: _as_dict(v) for k, v in vars(value).items() if k != "__path__"}
    if isinstance(value, list | tuple):
        return [_as_dict(v) for v in value]
    return value


def _fit_cli(config_path: str, args: Sequence[str]) -> Any:
    """The base config parsed and instantiated by the ``kd fit`` CLI (nothing trained)."""
    import warnings

    from kd_lightning.cli import KDCLI

    with warnings.catch_warnings():  # "args and sys.argv both given": sys.argv belongs to kd search-student
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return KDCLI(args=["--config", str(config_path), *args], run=False)


def build_class_config(spec: Mapping[str, Any], field: str) -> nn.Module:
    """An ``nn.Module`` from ``{"class_path", "init_args"}``."""
    from kd_lightning.commands.model_stats import resolve_class

    class_path = spec.get("class_path")
    if not class_path:
        raise KDConfigError(field, f"is not a class_path config: {spec!r}", "give class_path and init_args")
    return resolve_class(str(class_path))(**dict(spec.get("init_args") or {}))


def _teacher_spec(cli: Any) -> dict[str, Any]:
    init_args = _as_dict(cli.config["model"]["init_args"])
    teacher = init_args.get("teacher")
    if not teacher or init_args.get("teachers"):
        raise KDConfigError(
            "base_config",
            "kd search-student needs a config with one model.init_args.teacher",
            "use a single-teacher config such as configs/digits_kd.yaml",
        )
    return teacher


def _batches(datamodule: Any, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from kd_lightning.methods.tasks.classification import regime_parts

    if count < 1:
        raise KDConfigError("score.batches", f"must be >= 1, got {count}", "the paper scores on one batch")
    datamodule.prepare_data()
    datamodule.setup("fit")
    torch.manual_seed(seed)
    out = []
    for batch in datamodule.train_dataloader():
        labeled, _ = regime_parts(batch)
        if labeled is None:
            raise KDConfigError(
                "base_config", "the data module serves no labeled batches", "DisWOT scores need (x, y) batches"
            )
        out.append((labeled[0], labeled[1]))
        if len(out) == count:
            break
    if len(out) < count:
        raise KDConfigError("score.batches", f"the training data has only {len(out)} batches", f"use <= {len(out)}")
    return out


def _scorer(config: dict[str, Any], teacher: nn.Module, batches: list, mode: str) -> Any:
    from kd_lightning.models.search import DisWOTScorer

    score = config["score"]
    return DisWOTScorer(
        teacher,
        batches,
        semantic_weight=float(score["semantic_weight"]),
        relation_weight=float(score["relation_weight"]),
        semantic_mode=mode,
        teacher_classifier=score["teacher_classifier"],
        teacher_feature=score["teacher_feature"],
        student_classifier=score["student_classifier"],
        student_feature=score["student_feature"],
    )


def prepare(config: dict[str, Any]) -> tuple[Any, nn.Module, list, int]:
    """``(fit CLI of the base config, teacher network, scoring batches, num_classes)``."""
    from kd_lightning.models.checkpoints import load_weights

    cli = _fit_cli(config["base_config"], config["base_args"])
    score = config["score"]
    torch.manual_seed(int(score["teacher_seed"]))
    teacher = build_class_config(_teacher_spec(cli), "base_config")
    if config["teacher_ckpt"]:
        load_weights(teacher, config["teacher_ckpt"], field="teacher_ckpt")
    batches = _batches(cli.datamodule, int(score["batches"]), int(score["seed"]))
    num_classes = getattr(cli.datamodule, "num_classes", None)
    if num_classes is None:
        fc = getattr(teacher, "fc", None)
        num_classes = fc.out_features if isinstance(fc, nn.Linear) else None
    if num_classes is None:
        raise KDConfigError("base_config", "cannot tell the number of classes", "use a data module with num_classes")
    return cli, teacher, batches, int(num_classes)


def _teacher_width(teacher: nn.Module, classifier: str) -> int:
    from kd_lightning.models.search import classifier_of

    return classifier_of(teacher, classifier).in_features


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _write_rows(path: Path, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()})


def winner_fit_config(cli: Any, student: Mapping[str, Any], note: str) -> str:
    """The base config, fully resolved by the ``kd fit`` parser, with ``model.init_args.student`` replaced."""
    dumped = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    dumped["model"]["init_args"]["student"] = dict(student)
    return note + yaml.safe_dump(dumped, sort_keys=False)


def check_settings(config: dict[str, Any]) -> None:
    """Check the score and evolution settings before anything is built.

    Raises:
        KDConfigError: naming ``score.<field>`` or ``evolution.<field>``.
    """
    from kd_lightning.models.search import PARENT_SELECTIONS, SEMANTIC_MODES

    score, evolution = config["score"], config["evolution"]
    if score["semantic_mode"] not in SEMANTIC_MODES:
        raise KDConfigError(
            "score.semantic_mode",
            f"unknown mode {score['semantic_mode']!r}",
            f"choose one of {', '.join(SEMANTIC_MODES)}",
        )
    if evolution["parent_selection"] not in PARENT_SELECTIONS:
        raise KDConfigError(
            "evolution.parent_selection",
            f"unknown mode {evolution['parent_selection']!r}",
            f"choose one of {', '.join(PARENT_SELECTIONS)} (best: the fixed tournament)",
        )
    for section, name, least in (
        ("score", "batches", 1),
        ("score", "zen_batch_size", 2),
        ("evolution", "population", 1),
        ("evolution", "sample_size", 1),
        ("evolution", "cycles", 0),
        ("evolution", "max_tries", 1),
        ("evolution", "official_top_n", 1),
    ):
        value = config[section][name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise KDConfigError(f"{section}.{name}", f"must be an integer >= {least}, got {value!r}", "")
    for name in ("seed", "teacher_seed"):
        if isinstance(score[name], bool) or not isinstance(score[name], int):
            raise KDConfigError(f"score.{name}", f"must be an integer, got {score[name]!r}", "")


# ---------------------------------------------------------------------------------------------- modes
def run_search(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """The search: writes the ranking and the winner's configs in ``out``; returns the ranking JSON."""
    from kd_lightning.models.search import Budget, build_space, resolve_semantic_mode, search_students

    started = time.perf_counter()
    space = build_space(config["space"])
    budget = Budget(**config["budget"])
    check_settings(config)
    cli, teacher, batches, num_classes = prepare(config)
    shape = tuple(batches[0][0].shape[1:])
    if shape != space.input_shape:
        raise KDConfigError(
            "space.in_channels",
            f"the data's inputs are {list(shape)} and the space builds for {list(space.input_shape)} "
            "(in_channels, image_size, image_size)",
            "set space.in_channels and space.image_size to the data's",
        )
    score = config["score"]
    width = _teacher_width(teacher, score["teacher_classifier"])
    mode, note = resolve_semantic_mode(str(score["semantic_mode"]), width, sorted(space.final_widths()))
    if note and float(score["semantic_weight"]):
        print(f"kd: {note}", flush=True)
    scorer = _scorer(config, teacher, batches, mode)
    evolution = dict(config["evolution"])
    result = search_students(
        space,
        scorer,
        num_classes,
        budget,
        seed=int(evolution.pop("seed")),
        baselines=bool(score["baselines"]),
        population_size=int(evolution.pop("population")),
        sample_size=int(evolution.pop("sample_size")),
        cycles=int(evolution.pop("cycles")),
        parent_selection=str(evolution.pop("parent_selection")),
        max_tries=int(evolution.pop("max_tries")),
        official_top_n=int(evolution.pop("official_top_n")),
    )
    rows = []
    for rank, member in enumerate(result.ranking, start=1):
        rows.append(
            {
                "rank": rank,
                "label": space.label(member.arch),
                "score": member.score,
                **{k: member.extras.get(k) for k in ("semantic", "relation", "semantic_mode", "naswot", "zen")},
                "params": member.params,
                "flops": member.flops,
                "born": member.born,
                "arch": space.to_json(member.arch),
                "student": space.class_config(member.arch, num_classes),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    _write_rows(out / "ranking.csv", rows, RANKING_FIELDS)
    winner = rows[0]
    report = {
        "method": "DisWOT (Dong, Li & Wei, CVPR 2023); regularised evolution with the best-of-tournament parent",
        "settings": config,
        "semantic_mode": mode,
        "semantic_note": note,
        "teacher": {"weights": config["teacher_ckpt"] or "random (teacher_seed)", "final_width": width},
        "evaluated": len(result.ranking),
        "evaluations": len(result.history),
        "skipped_children": result.skipped_children,
        "seconds": round(time.perf_counter() - started, 3),
        "winner": winner,
        "ranking": [{k: _clean(v) for k, v in row.items()} for row in rows],
        "history": [[space.label(m.arch), _clean(m.score)] for m in result.history],
    }
    (out / "ranking.json").write_text(json.dumps(report, indent=2, default=str))
    header = (
        f"# Student found by kd search-student (DisWOT) from {config['base_config']}: {winner['label']}\n"
        f"# DisWOT score {winner['score']:.6g}, {winner['params']:,} parameters, {winner['flops']:,} FLOPs.\n"
    )
    (out / "winner_student.yaml").write_text(header + yaml.safe_dump(winner["student"], sort_keys=False))
    (out / "winner_fit.yaml").write_text(
        winner_fit_config(cli, winner["student"], header + "# kd fit --config this file distils it.\n")
    )
    print(
        f"kd: search-student: {len(result.ranking)} candidates ({len(result.history)} evaluations) in "
        f"{report['seconds']:.1f} s; winner {winner['label']} (score {winner['score']:.6g}, "
        f"{winner['params']:,} params, {winner['flops']:,} FLOPs)\n"
        f"kd: wrote {out / 'ranking.csv'}, {out / 'winner_student.yaml'}; distil it with\n"
        f"    kd fit --config {out / 'winner_fit.yaml'}",
        flush=True,
    )
    return report


def grid_students(grid_path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(run name, student class config)`` of every run of a ``kd bench`` grid, as ``kd fit`` parses them."""
    from kd_lightning.commands.bench import load_grid

    grid = load_grid(grid_path)
    out = []
    for name, run in grid.runs.items():
        cli = _fit_cli(str(run.config), [*grid.args, *run.args])
        student = _as_dict(cli.config["model"]["init_args"]["student"])
        out.append((name, {"class_path": student["class_path"], "init_args": student.get("init_args") or {}}))
    return out


def run_score_grid(config: dict[str, Any], grid_path: str | Path, out: Path) -> list[dict[str, Any]]:
    """Score the student of every run of a grid (``scores.csv`` / ``scores.json`` in ``out``)."""
    from kd_lightning.models.search import classifier_of, evaluate_network, resolve_semantic_mode

    started = time.perf_counter()
    students = grid_students(grid_path)
    _, teacher, batches, _ = prepare(config)
    score = config["score"]
    seed = int(score["seed"])
    shape = tuple(batches[0][0].shape[1:])
    widths = []
    for name, spec in students:
        network = build_class_config(spec, f"grid.runs.{name}")
        widths.append(classifier_of(network, score["student_classifier"]).in_features)
    width = _teacher_width(teacher, score["teacher_classifier"])
    mode, note = resolve_semantic_mode(str(score["semantic_mode"]), width, widths)
    if note and float(score["semantic_weight"]):
        print(f"kd: {note}", flush=True)
    scorer = _scorer(config, teacher, batches, mode)
    rows = []
    for name, spec in students:
        values = evaluate_network(
            lambda spec=spec, name=name: build_class_config(spec, f"grid.runs.{name}"),
            scorer,
            shape,
            seed=seed,
            baselines=bool(score["baselines"]),
            zen_batch_size=int(score["zen_batch_size"]),
        )
        rows.append({"run": name, **values, "student": spec})
    out.mkdir(parents=True, exist_ok=True)
    fields = ("run", "score", "semantic", "relation", "semantic_mode", "params", "flops", "naswot", "zen", "student")
    _write_rows(out / "scores.csv", rows, fields)
    report = {
        "grid": str(Path(grid_path).resolve()),
        "settings": config,
        "semantic_mode": mode,
        "semantic_note": note,
        "teacher": {"weights": config["teacher_ckpt"] or "random (teacher_seed)", "final_width": width},
        "seconds": round(time.perf_counter() - started, 3),
        "scores": [{k: _clean(v) for k, v in row.items()} for row in rows],
    }
    (out / "scores.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"kd: scored {len(rows)} students of {grid_path} in {report['seconds']:.1f} s: {out / 'scores.csv'}")
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    """``kd search-student``: the search (or ``--score-grid``); returns the ranking report (or the score rows)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, fit_args = argv[:cut], argv[cut + 1 :]
    args, overrides = build_parser().parse_known_args(argv)
    config = load_search_config(args.config, overrides)
    out = Path(args.out or config["out"])
    if args.score_grid:
        if args.fit:
            raise KDConfigError("--fit", "does not go with --score-grid", "kd bench the grid to train its students")
        return run_score_grid(config, args.score_grid, out)
    if fit_args and not args.fit:
        raise KDConfigError("--", f"arguments for kd fit ({' '.join(fit_args)}) without --fit", "add --fit")
    report = run_search(config, out)
    if args.fit:
        from kd_lightning.cli import run

        cli = run(["fit", "--config", str(out / "winner_fit.yaml"), *fit_args])
        report["fit_results"] = dict(getattr(cli, "results", {}) or {})
    return report


if __name__ == "__main__":  # pragma: no cover
    main()
