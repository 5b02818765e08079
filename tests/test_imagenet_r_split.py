"""ImageNet-R's published split (``data.train_list`` / ``data.test_list``, the CODA-Prompt
protocol's ``imagenet-r_{train,test}.yaml``) on a tiny generated class-folder tree, its one-line
errors through the CLI, and ``sweeps/imagenet_r.yaml`` validated point by point without data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clsim.cli import main
from clsim.data.vision import imagenet_r
from clsim.errors import ConfigError, DataNotFoundError
from clsim.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01443537", "n01484850", "n01494475"]
# CODA-Prompt's labels are not the sorted wnid order: here the sorted third class is label 0.
LABELS = {"n01443537": 2, "n01484850": 0, "n01494475": 1}
PREFIX = "data/imagenet-r"  # how the code's lists spell the paths (relative to its repository)


@pytest.fixture
def tree(tmp_path) -> Path:
    """``tmp_path/imagenet-r/<wnid>/{art,sketch}_<i>.{jpg,png}``: 4 images per class."""
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        for i in range(4):
            path = tmp_path / "imagenet-r" / wnid / f"{'art' if i % 2 else 'sketch'}_{i}.{'jpg' if i < 2 else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(path)
    return tmp_path


# Train: three images of every class, test: the fourth, in an interleaved order (file order kept);
# n01494475/sketch_2.png is in neither list.
TRAIN = [(w, f) for f in ("art_1.jpg", "sketch_0.jpg", "sketch_2.png") for w in WNIDS
         if (w, f) != ("n01494475", "sketch_2.png")]
TEST = [(w, "art_3.png") for w in reversed(WNIDS)]


def write_list(path: Path, entries: list[tuple[str, str]], *, targets: bool = True) -> Path:
    text = "data:\n" + "".join(f"- {PREFIX}/{w}/{f}\n" for w, f in entries)
    if targets:
        text += "targets:\n" + "".join(f"- {LABELS[w]}\n" for w, _ in entries)
    path.write_text(text)
    return path


@pytest.fixture
def lists(tree) -> tuple[Path, Path]:
    return write_list(tree / "imagenet-r_train.yaml", TRAIN), write_list(tree / "imagenet-r_test.yaml", TEST)


def published(root: Path, train: Path | str, test: Path | str, **kw):
    return imagenet_r(root=str(root), image_size=8, train_list=str(train), test_list=str(test), **kw)


# --------------------------------------------------------------------------- read exactly


def test_the_lists_are_the_split_exactly(tree, lists):
    source = published(tree, *lists)
    folder = tree / "imagenet-r"
    assert source.train.samples == [(str(folder / w / f), LABELS[w]) for w, f in TRAIN]
    assert source.test.samples == [(str(folder / w / f), LABELS[w]) for w, f in TEST]
    # label k is the class the files give label k
    assert source.class_names == ("n01484850", "n01494475", "n01443537")
    # the image in neither list is in neither split
    every = {str(p) for p in folder.rglob("*.*")}
    assert every - {p for p, _ in source.train.samples + source.test.samples} == {
        str(folder / "n01494475" / "sketch_2.png")}
    assert source.train[0][0].shape == (3, 8, 8)


def test_sorted_class_order_makes_the_lists_labels_the_task_order(tree, lists):
    """As the code at its seed 0: task t holds the classes the files label t (one class a task here)."""
    from clsim.config import parse_config
    from clsim.learner import build_scenario

    config = parse_config({
        "name": "order", "seed": 3,
        "data": {"name": "imagenet_r", "root": str(tree), "image_size": 8,
                 "train_list": str(lists[0]), "test_list": str(lists[1])},
        "scenario": {"name": "class_incremental", "n_tasks": 3, "class_order": "sorted"},
        "model": {"name": "mlp", "hidden": [4]}, "strategy": {"name": "finetune"},
    })
    scenario = build_scenario(config)
    by_label = {y: w for w, y in LABELS.items()}
    for t, exp in enumerate(scenario.experiences):
        paths = [exp.train.base.samples[i][0] for i in exp.train.indices]
        assert paths and {Path(p).parent.name for p in paths} == {by_label[t]}


def test_the_seeded_split_stays_the_default_and_the_lists_ignore_its_seed(tree, lists):
    seeded = imagenet_r(root=str(tree), image_size=8)
    assert len(seeded.train) + len(seeded.test) == 12 and seeded.class_names == tuple(WNIDS)
    assert published(tree, *lists, split_seed=0).train.samples == published(tree, *lists, split_seed=5).train.samples


def test_without_targets_labels_follow_the_sorted_training_classes(tree):
    train = write_list(tree / "train.yaml", TRAIN, targets=False)
    test = write_list(tree / "test.yaml", TEST, targets=False)
    source = published(tree, train, test)
    assert source.class_names == tuple(WNIDS)
    assert source.test.targets == [2, 1, 0]  # TEST lists the classes in reverse


def test_a_relative_list_is_found_in_the_data_root(tree, lists, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    source = published(tree, "imagenet-r_train.yaml", "imagenet-r_test.yaml")
    assert len(source.train) == len(TRAIN) and len(source.test) == len(TEST)


# --------------------------------------------------------------------------- bad split files


def bad_train(tree: Path, text: str | bytes) -> Path:
    path = tree / "bad_train.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD_HEAD = f"data:\n- {PREFIX}/n01443537/art_1.jpg\n"  # line 2 is a good entry


@pytest.mark.parametrize("text, line, words", [
    (GOOD_HEAD + f"- {PREFIX}/n01443537/gone.jpg\ntargets:\n- 2\n- 2\n", 3, "not found"),
    (GOOD_HEAD + "- 17\ntargets:\n- 2\n- 2\n", 3, "expected an image path ending in <wnid>/<file>"),
    (GOOD_HEAD + "- art_1.jpg\ntargets:\n- 2\n- 2\n", 3, "expected an image path ending in <wnid>/<file>"),
    (GOOD_HEAD + "- {x: 1}\ntargets:\n- 2\n- 2\n", 3, "expected an image path"),
    (GOOD_HEAD + "targets:\n- two\n", 4, "expected a label (an int >= 0)"),
    (GOOD_HEAD + "targets:\n- -1\n", 4, "expected a label (an int >= 0)"),
    (GOOD_HEAD + "targets: 2\n", 3, "'targets' is not a list"),
    (GOOD_HEAD + "  - : [\n", 3, "not valid YAML"),
    (GOOD_HEAD + f"- {PREFIX}/n01443537/art_1.jpg\ntargets:\n- 2\n- 2\n", 3, "listed again (line 2"),
    (GOOD_HEAD + f"- {PREFIX}/n01484850/art_1.jpg\ntargets:\n- 2\n- 2\n", 3, "has label 2"),
])
def test_a_bad_entry_names_the_file_and_line(tree, lists, text, line, words):
    path = bad_train(tree, text)
    with pytest.raises(ConfigError) as err:
        published(tree, path, lists[1])
    assert err.value.path == "data.train_list"
    assert f"{path}, line {line}:" in err.value.message and words in err.value.message


@pytest.mark.parametrize("text, words", [
    ("", "an empty file"),
    (b"\xff\xfe\x00data", "not a text file (UTF-8)"),
    ("- a/b.jpg\n", "no mapping"),
    ("images:\n- a/b.jpg\n", "unknown key 'images'"),
    ("targets:\n- 0\n", "no 'data' key"),
    ("data: []\n", "lists no images"),
    (GOOD_HEAD + "targets:\n- 2\n- 2\n", "1 paths in 'data' but 2 labels"),
])
def test_a_bad_file_names_the_file(tree, lists, text, words):
    path = bad_train(tree, text)
    with pytest.raises(ConfigError) as err:
        published(tree, path, lists[1])
    assert err.value.path == "data.train_list" and str(path) in err.value.message
    assert words in err.value.message


def test_labels_with_a_gap_are_an_error(tree, monkeypatch):
    monkeypatch.setitem(LABELS, "n01484850", 3)  # labels 1, 2, 3: label 0 is never given
    train, test = write_list(tree / "train.yaml", TRAIN), write_list(tree / "test.yaml", TEST)
    with pytest.raises(ConfigError, match="skip label 0; expected 0..K-1"):
        published(tree, train, test)


def test_a_missing_image_is_a_data_error_counting_the_others(tree, lists):
    (tree / "imagenet-r" / "n01484850" / "art_3.png").unlink()
    (tree / "imagenet-r" / "n01443537" / "art_3.png").unlink()
    with pytest.raises(DataNotFoundError) as err:
        published(tree, *lists)
    assert err.value.path == "data.test_list"
    assert f"{lists[1]}, line 3: image {tree / 'imagenet-r' / 'n01484850' / 'art_3.png'} not found" in err.value.message
    assert "1 more of its 3 images are missing" in err.value.message


def test_an_image_in_both_lists_is_named(tree, lists):
    test = write_list(tree / "test2.yaml", [*TEST, TRAIN[0]])
    with pytest.raises(ConfigError, match=r"line 5: n01443537/art_1.jpg is listed again \(line 2, in .*train"):
        published(tree, lists[0], test)


def test_targets_in_one_file_only_and_one_list_only_are_errors(tree, lists):
    test = write_list(tree / "test2.yaml", TEST, targets=False)
    with pytest.raises(ConfigError, match="give labels in both or in neither"):
        published(tree, lists[0], test)
    with pytest.raises(ConfigError) as err:
        imagenet_r(root=str(tree), train_list=str(lists[0]))
    assert err.value.path == "data.test_list" and "give both" in err.value.message


def test_a_class_only_in_the_test_list_is_named(tree):
    train = write_list(tree / "train.yaml", [e for e in TRAIN if e[0] != "n01484850"], targets=False)
    test = write_list(tree / "test.yaml", TEST, targets=False)
    with pytest.raises(ConfigError, match=r"test.yaml, line 3: class n01484850 has no image in the training list"):
        published(tree, train, test)


def test_a_missing_list_says_where_it_looked(tree, lists, monkeypatch):
    monkeypatch.chdir(tree / "imagenet-r")
    with pytest.raises(DataNotFoundError) as err:
        published(tree, lists[0], "nowhere.yaml")
    assert err.value.path == "data.test_list"
    assert str(tree / "imagenet-r" / "nowhere.yaml") in err.value.message
    assert str(tree / "nowhere.yaml") in err.value.message


def test_through_the_cli_a_bad_list_is_one_line_exit_2_and_nothing_written(tree, lists, capsys):
    bad = bad_train(tree, GOOD_HEAD + f"- {PREFIX}/n01443537/gone.jpg\n")
    config = tree / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "split", "seed": 0,
        "data": {"name": "imagenet_r", "root": str(tree), "image_size": 8,
                 "train_list": str(bad), "test_list": str(lists[1])},
        "scenario": {"name": "class_incremental", "n_tasks": 3},
        "model": {"name": "vit", "embed_dim": 8, "depth": 1, "num_heads": 2, "patch_size": 4},
        "strategy": {"name": "finetune"},
        "train": {"epochs": 1, "batch_size": 4},
    }))
    out = tree / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"data.train_list: {bad}, line 3: image" in err
    assert not out.exists()


# --------------------------------------------------------------------------- the table's sweep


def test_the_imagenet_r_sweep_runs_every_table_row_over_3_seeds(monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(ROOT / "sweeps" / "imagenet_r.yaml")  # builds every point's config: no data
    rows = sorted(ROOT.glob("scenarios/imagenet_r*.yaml"))
    assert {p.base.name for p in sweep.points} == {r.name for r in rows}
    assert len(sweep.points) == 3 * len(rows) and {p.seed for p in sweep.points} == {0, 1, 2}
    for point in sweep.points:
        assert "data.train_list=imagenet-r_train.yaml" in point.overrides
        assert "data.test_list=imagenet-r_test.yaml" in point.overrides


@pytest.mark.parametrize("row", sorted(p.name for p in ROOT.glob("scenarios/imagenet_r*.yaml")))
def test_every_table_row_states_the_papers_number(row):
    header = (ROOT / "scenarios" / row).read_text().split("\nname:")[0]
    assert "Paper's number for this row:" in header
    assert "confirmed" in header  # "NOT confirmed" / "unconfirmed" / "confirmed against ..."
    assert "data.train_list" in header  # how to run it on the paper's split
