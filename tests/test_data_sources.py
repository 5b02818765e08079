"""Data sources on tiny fake data written in each data set's real on-disk format; no network.

torchvision's CIFAR classes check the md5 of every file they read, which fake files cannot
match: the ``no_md5`` fixture replaces ``torchvision.datasets.cifar.check_integrity`` (used by
both the batch and the meta-file checks) with an existence check, in these tests only.
"""

from __future__ import annotations

import functools
import inspect
import os
import pickle
import typing
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image

import clsim.data  # noqa: F401  (registers every source)
from clsim.config import parse_section
from clsim.data import Source
from clsim.data.embedded import digits, synthetic
from clsim.data.vision import (
    CIFAR_STATS, IMAGENET_MEAN, IMAGENET_STD, cifar10, cifar100, data_root, image_folder,
    imagenet_r, tiny_imagenet,
)
from clsim.errors import ConfigError, DataNotFoundError
from clsim.registry import DATASETS

WNIDS = ["n01443537", "n01484850", "n01494475"]


# --------------------------------------------------------------------------- every source


@pytest.mark.parametrize("name", DATASETS.names())
def test_source_signature_follows_the_config_conventions(name):
    factory = DATASETS.get(name)
    params = inspect.signature(factory).parameters
    hints = typing.get_type_hints(factory)
    doc = inspect.getdoc(factory)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert set(params) <= set(hints) and hints["return"] is Source
    assert doc and doc.splitlines()[1] == "" and "Args:" in doc
    for param in params:
        assert f"\n    {param}:" in doc, f"{name}: '{param}' not in the Args section"


@pytest.mark.parametrize("name, n", [("cifar10", 10), ("cifar100", 100), ("imagenet_r", 200),
                                     ("tiny_imagenet", 200)])
def test_fixed_sources_declare_num_classes(name, n):
    assert DATASETS.get(name).num_classes == n


def test_a_yaml_section_is_the_call():
    section = parse_section("data", {"name": "cifar10", "root": "~/data", "image_size": 224},
                            DATASETS)
    assert section.factory is cifar10
    assert section.kwargs == {"root": "~/data", "image_size": 224, "download": False, "augment": True}


@pytest.mark.parametrize("factory", [cifar10, cifar100, imagenet_r, tiny_imagenet, image_folder])
def test_bad_image_size_is_a_config_error(factory, tmp_path):
    with pytest.raises(ConfigError) as err:
        factory(root=str(tmp_path), image_size=0)
    assert err.value.path == "data.image_size" and "got 0" in err.value.message


def test_data_root_default_env_and_user_expansion(tmp_path, monkeypatch):
    monkeypatch.delenv("CLSIM_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root() == tmp_path.resolve() / ".cache" / "clsim" / "data"
    assert data_root("~/sets") == tmp_path.resolve() / "sets"
    monkeypatch.setenv("CLSIM_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path.resolve() / "env"
    assert data_root("$CLSIM_DATA/x") == tmp_path.resolve() / "env" / "x"


# --------------------------------------------------------------------------- CIFAR


def write_cifar(root: Path, name: str, *, per_batch: int = 4) -> tuple[list[int], list[int]]:
    """Fake CIFAR in torchvision's pickle layout; image i is flat, channel c = 10 * c + i."""

    def batch(n: int, labels_key: str, offset: int) -> dict:
        labels = [(offset + i) % n_classes for i in range(n)]
        data = np.zeros((n, 3, 32 * 32), dtype=np.uint8)
        data += (10 * np.arange(3)[None, :, None] + np.arange(n)[:, None, None]).astype(np.uint8)
        entry = {"batch_label": b"fake", "data": data.reshape(n, 3072), labels_key: labels,
                 "filenames": [f"img_{offset + i}.png" for i in range(n)]}
        if labels_key == "fine_labels":
            entry["coarse_labels"] = [y // 5 for y in labels]
        return entry

    def dump(path: Path, obj: dict) -> None:
        path.write_bytes(pickle.dumps(obj, protocol=2))

    n_classes = 10 if name == "cifar10" else 100
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    key = "labels" if name == "cifar10" else "fine_labels"
    train_files = [f for f, _ in cls.train_list]
    n_train = per_batch * 10 // len(train_files)  # 40 train images either way
    train_labels: list[int] = []
    for b, file in enumerate(train_files):
        entry = batch(n_train, key, b * n_train)
        train_labels += entry[key]
        dump(folder / file, entry)
    test = batch(per_batch, key, 0)
    dump(folder / cls.test_list[0][0], test)
    names = [f"{name}_class_{c}" for c in range(n_classes)]
    meta = {cls.meta["key"]: names}
    if name == "cifar100":
        meta["coarse_label_names"] = [f"super_{c}" for c in range(20)]
    dump(folder / cls.meta["filename"], meta)
    return train_labels, test[key]


@pytest.fixture
def no_md5(monkeypatch):
    """Accept any existing file as intact (fake files cannot match torchvision's md5 sums)."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("name, factory", [("cifar10", cifar10), ("cifar100", cifar100)])
def test_cifar_reads_torchvision_format(name, factory, tmp_path, no_md5):
    train_labels, test_labels = write_cifar(tmp_path, name)
    src = factory(root=str(tmp_path))
    assert src.name == name and src.input_shape == (3, 32, 32)
    assert src.num_classes == factory.num_classes == len(src.class_names)
    assert src.class_names[3] == f"{name}_class_3"
    assert list(src.train.targets) == train_labels and list(src.test.targets) == test_labels
    x, y = src.test[2]
    assert x.shape == (3, 32, 32) and y == test_labels[2]
    mean, std = CIFAR_STATS[name]
    pixel = torch.tensor([2.0, 12.0, 22.0]) / 255  # image 2 of write_cifar
    expected = (pixel - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(x.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)
    assert src.train[0][0].shape == (3, 32, 32)


def test_cifar_resizes_for_pretrained_models(tmp_path, no_md5):
    write_cifar(tmp_path, "cifar10")
    src = cifar10(root=str(tmp_path), image_size=64, augment=False)
    assert src.input_shape == (3, 64, 64)
    assert src.train[0][0].shape == src.test[0][0].shape == (3, 64, 64)


def test_cifar_root_from_environment(tmp_path, monkeypatch, no_md5):
    write_cifar(tmp_path, "cifar10")
    monkeypatch.setenv("CLSIM_DATA", str(tmp_path))
    assert len(cifar10().train) == 40


@pytest.mark.parametrize("factory, folder", [(cifar10, "cifar-10-batches-py"),
                                             (cifar100, "cifar-100-python")])
def test_cifar_missing_says_where_and_how(factory, folder, tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        factory(root=str(tmp_path / "none"))
    message = err.value.message
    assert err.value.path == "data.root"
    assert str((tmp_path / "none" / folder).resolve()) in message
    assert "download: true" in message and folder in message


def test_cifar_fails_torchvision_md5_check_as_corrupted(tmp_path):
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(DataNotFoundError, match="corrupted"):
        cifar10(root=str(tmp_path))


def test_cifar_download_offline_is_one_line_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError) as err:
        cifar10(root=str(tmp_path), download=True)
    message = err.value.message
    assert "download" in message and "failed" in message and "name resolution" in message
    assert str(tmp_path.resolve()) in message and "\n" not in str(err.value)


# --------------------------------------------------------------------------- image trees


def write_image(path: Path, seed: int, size: tuple[int, int] = (12, 10), mode: str = "RGB"):
    """A small random image; the format follows the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def write_class_tree(folder: Path, counts: dict[str, int]) -> list[Path]:
    """``folder/<class>/img_<i>.(jpg|png)``; returns the image paths."""
    paths = []
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            path = folder / name / f"img_{i:02d}.{'jpg' if i % 2 else 'png'}"
            write_image(path, seed=100 * c + i)
            paths.append(path)
    return paths


def paths_of(dataset) -> list[str]:
    return [p for p, _ in dataset.samples]


@pytest.fixture
def imagenet_r_root(tmp_path) -> Path:
    counts = dict(zip(WNIDS, [10, 5, 7]))
    write_class_tree(tmp_path / "imagenet-r", counts)
    (tmp_path / "imagenet-r" / WNIDS[0] / "._img_00.jpg").write_bytes(b"mac metadata")
    (tmp_path / "imagenet-r" / "README.txt").write_text("not a class")
    return tmp_path


def test_imagenet_r_split_is_80_20_per_class_and_covers_every_file(imagenet_r_root):
    src = imagenet_r(root=str(imagenet_r_root), image_size=16)
    assert src.class_names == tuple(WNIDS) and src.input_shape == (3, 16, 16)
    assert np.bincount(src.test.targets).tolist() == [2, 1, 1]
    assert np.bincount(src.train.targets).tolist() == [8, 4, 6]
    train, test = set(paths_of(src.train)), set(paths_of(src.test))
    every = {str(p) for p in (imagenet_r_root / "imagenet-r").rglob("img_*")}
    assert not train & test and train | test == every
    for path, label in src.train.samples + src.test.samples:
        assert Path(path).parent.name == WNIDS[label]
    assert src.train[0][0].shape == src.test[0][0].shape == (3, 16, 16)


def test_imagenet_r_split_is_fixed_by_split_seed(imagenet_r_root):
    def split(seed, root=imagenet_r_root):
        return paths_of(imagenet_r(root=str(root), split_seed=seed).test)

    assert split(0) == split(0)
    assert split(0) == split(0, root=imagenet_r_root / "imagenet-r")  # root = the folder itself
    assert split(0) != split(1)


def test_imagenet_r_without_augment_uses_imagenet_normalisation(imagenet_r_root):
    path = imagenet_r_root / "imagenet-r" / WNIDS[1] / "img_00.png"
    Image.new("RGB", (20, 20), (255, 0, 128)).save(path)
    src = imagenet_r(root=str(imagenet_r_root), image_size=8, augment=False)
    everything = src.train.samples + src.test.samples
    i = [p for p, _ in everything].index(str(path))
    x = src.train[i][0] if i < len(src.train) else src.test[i - len(src.train)][0]
    pixel = torch.tensor([1.0, 0.0, 128 / 255])
    expected = (pixel - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x, expected[:, None, None].expand(3, 8, 8), atol=1e-5)


def test_imagenet_r_missing_says_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        imagenet_r(root=str(tmp_path))
    assert str(tmp_path.resolve() / "imagenet-r") in err.value.message
    assert "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar" in err.value.message


def test_imagenet_r_empty_class_folder_is_named(imagenet_r_root):
    (imagenet_r_root / "imagenet-r" / "n09999999").mkdir()
    with pytest.raises(DataNotFoundError, match="n09999999 holds no images"):
        imagenet_r(root=str(imagenet_r_root))


def write_tiny_imagenet(root: Path, *, wnids_file: bool = True) -> list[tuple[str, str]]:
    """Fake ``tiny-imagenet-200``; returns the val annotations ``(file, wnid)``."""
    folder = root / "tiny-imagenet-200"
    order = [WNIDS[2], WNIDS[0], WNIDS[1]]  # wnids.txt is not sorted
    if wnids_file:
        folder.mkdir(parents=True)
        (folder / "wnids.txt").write_text("\n".join(order) + "\n")
    for c, wnid in enumerate(order):
        for i in range(3):
            write_image(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 10 * c + i,
                        size=(64, 64), mode="L" if i == 0 else "RGB")  # some are grey
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t9\t9\n")
    annotations = [(f"val_{i}.JPEG", order[i % 3]) for i in range(5)]
    for i, (file, _) in enumerate(annotations):
        write_image(folder / "val" / "images" / file, 1000 + i, size=(64, 64))
    (folder / "val" / "val_annotations.txt").write_text(
        "".join(f"{file}\t{wnid}\t0\t0\t63\t63\n" for file, wnid in annotations))
    return annotations


def test_tiny_imagenet_train_folders_and_official_val(tmp_path):
    annotations = write_tiny_imagenet(tmp_path)
    src = tiny_imagenet(root=str(tmp_path))
    order = list(src.class_names)
    assert order == [WNIDS[2], WNIDS[0], WNIDS[1]] and src.input_shape == (3, 64, 64)
    assert len(src.train) == 9 and np.bincount(src.train.targets).tolist() == [3, 3, 3]
    assert src.test.targets == [order.index(wnid) for _, wnid in annotations]
    assert [Path(p).name for p in paths_of(src.test)] == [file for file, _ in annotations]
    assert src.train[0][0].shape == (3, 64, 64)  # a grey JPEG, converted to RGB
    assert src.test[0][0].shape == (3, 64, 64)


def test_tiny_imagenet_without_wnids_uses_sorted_folders(tmp_path):
    write_tiny_imagenet(tmp_path, wnids_file=False)
    src = tiny_imagenet(root=str(tmp_path / "tiny-imagenet-200"), image_size=32)
    assert src.class_names == tuple(WNIDS) and src.input_shape == (3, 32, 32)


def test_tiny_imagenet_missing_says_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        tiny_imagenet(root=str(tmp_path))
    assert str(tmp_path.resolve() / "tiny-imagenet-200") in err.value.message
    assert "tiny-imagenet-200.zip" in err.value.message


def test_tiny_imagenet_bad_val_annotations_are_named(tmp_path):
    write_tiny_imagenet(tmp_path)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn00000000\n")
    with pytest.raises(DataNotFoundError, match="line 6"):
        tiny_imagenet(root=str(tmp_path))
    annotations.unlink()
    with pytest.raises(DataNotFoundError, match="val_annotations.txt"):
        tiny_imagenet(root=str(tmp_path))


def test_image_folder_single_tree_is_split_per_class(tmp_path):
    files = write_class_tree(tmp_path / "pets", {"cat": 5, "dog": 10})
    (tmp_path / "pets" / "dog" / "notes.txt").write_text("not an image")
    src = image_folder(root=str(tmp_path / "pets"), image_size=16, test_fraction=0.4)
    assert src.class_names == ("cat", "dog") and src.input_shape == (3, 16, 16)
    assert np.bincount(src.test.targets).tolist() == [2, 4]
    assert sorted(paths_of(src.train) + paths_of(src.test)) == sorted(map(str, files))
    again = image_folder(root=str(tmp_path / "pets"), image_size=16, test_fraction=0.4)
    assert paths_of(again.test) == paths_of(src.test)


def test_image_folder_train_and_test_trees(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 3, "b": 2, "c": 2})
    write_class_tree(tmp_path / "test", {"b": 2, "c": 1})  # a class may lack test images
    src = image_folder(root=str(tmp_path), image_size=8)
    assert src.class_names == ("a", "b", "c")
    assert src.train.targets == [0, 0, 0, 1, 1, 2, 2] and src.test.targets == [1, 1, 2]
    assert src.test[0][0].shape == (3, 8, 8)


@pytest.mark.parametrize("tree, kwargs, error, words", [
    ({"only": 3}, {}, ConfigError, "at least 2 class folders"),
    ({"a": 3, "b": 1}, {}, ConfigError, "class 'b' has 1 image"),
    ({"a": 3, "b": 3}, {"test_fraction": 1.5}, ConfigError, "data.test_fraction"),
    ({"a": 3, "b": 0}, {}, DataNotFoundError, "b holds no images"),
])
def test_image_folder_errors_name_the_folder(tmp_path, tree, kwargs, error, words):
    write_class_tree(tmp_path, tree)
    for name in tree:
        (tmp_path / name).mkdir(exist_ok=True)
    with pytest.raises(error) as err:
        image_folder(root=str(tmp_path), **kwargs)
    assert words in str(err.value)


def test_image_folder_test_class_unknown_to_train(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 2, "b": 2})
    write_class_tree(tmp_path / "test", {"a": 1, "z": 1})
    with pytest.raises(ConfigError, match=f"{tmp_path.resolve() / 'test' / 'z'} is not one of"):
        image_folder(root=str(tmp_path))


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        image_folder(root=str(tmp_path / "nowhere"))
    assert str(tmp_path.resolve() / "nowhere") in err.value.message


# --------------------------------------------------------------------------- embedded sources


def test_digits_is_the_real_data_split_stratified():
    src = digits()
    total = np.bincount(np.concatenate([src.train.targets, src.test.targets]))
    assert total.sum() == 1797 and src.num_classes == 10 and src.input_shape == (1, 8, 8)
    expected_test = np.maximum(1, np.round(total * 0.2)).astype(int)
    assert np.bincount(src.test.targets).tolist() == expected_test.tolist()
    assert src.train[0][0].shape == (1, 8, 8)


def test_digits_split_is_fixed_by_seed():
    a, b, c = digits(), digits(), digits(split_seed=1)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.test.images, c.test.images)


def test_digits_resized():
    src = digits(image_size=16)
    assert src.input_shape == (1, 16, 16) and src.test[0][0].shape == (1, 16, 16)
    with pytest.raises(ConfigError, match="data.image_size"):
        digits(image_size=4)


def test_synthetic_is_deterministic_by_seed():
    a, b, c = synthetic(), synthetic(), synthetic(seed=1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)


def test_synthetic_honours_its_shape_parameters():
    src = synthetic(num_classes=5, channels=1, image_size=12, samples_per_class=10)
    assert src.num_classes == 5 and src.input_shape == (1, 12, 12)
    assert src.train.images.shape[1:] == (1, 12, 12)
    counts = np.bincount(np.concatenate([src.train.targets, src.test.targets]))
    assert counts.tolist() == [10] * 5


@functools.lru_cache(maxsize=None)
def synthetic_accuracies(max_shift: int | None) -> tuple[float, float]:
    """Test accuracy of logistic regression on pixels, and on |FFT| (translation invariant)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    src = synthetic() if max_shift is None else synthetic(max_shift=max_shift)

    def accuracy(features) -> float:
        with threadpool_limits(1):  # multi-threaded BLAS is 10-40x slower on this small problem
            clf = LogisticRegression(max_iter=300).fit(features(src.train.images), src.train.targets)
        return clf.score(features(src.test.images), src.test.targets)

    pixels = accuracy(lambda x: x.flatten(1).numpy())
    # |FFT| is exactly invariant to the generator's circular translations.
    invariant = accuracy(lambda x: torch.fft.fft2(x).abs().flatten(1).numpy())
    return pixels, invariant



@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("max_shift", [pytest.param(None, id="default"),
                                       pytest.param(8, id="max_shift=8")])
def test_synthetic_is_hard_for_a_linear_model(max_shift):
    pixels, _ = synthetic_accuracies(max_shift)
    assert 0.2 < pixels < 0.8  # well above chance (0.1), well below solved


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("max_shift", [None, 8], ids=["default", "max_shift=8"])
def test_synthetic_is_solved_by_a_translation_invariant_model(max_shift):
    pixels, invariant = synthetic_accuracies(max_shift)
    assert invariant > 0.95 and invariant > pixels


@pytest.mark.parametrize("normalize, mean", [("imagenet", 0.485), ("inception", 0.5), ("none", 0.0)])
def test_imagenet_r_normalization_matches_the_choice(imagenet_r_root, normalize, mean):
    source = imagenet_r(root=str(imagenet_r_root), image_size=32, augment=False, normalize=normalize)
    norm = source.test.transform.transforms[-1]
    assert norm.mean[0] == pytest.approx(mean)
    x, _ = source.test[0]
    assert x.shape == (3, 32, 32)



@pytest.mark.parametrize("factory", [digits, synthetic])
def test_validation_fraction_evaluates_on_held_out_training_images(factory, monkeypatch):
    """A tuning run trains and evaluates inside the training split: no test image appears in it."""
    import clsim.data.embedded as embedded

    monkeypatch.setattr(embedded, "standardize", lambda a, b: (a, b))  # raw pixels: compare images

    def rows(images):
        return {tuple(r.tolist()) for r in images.flatten(1)}

    plain, tuning = factory(), factory(validation_fraction=0.25)
    train, test = rows(plain.train.images), rows(plain.test.images)
    assert rows(tuning.train.images) | rows(tuning.test.images) == train
    assert not rows(tuning.test.images) & (rows(tuning.train.images) | test)
    expected = np.maximum(1, np.round(np.bincount(plain.train.targets) * 0.25)).astype(int)
    assert np.bincount(tuning.test.targets).tolist() == expected.tolist()
    assert factory(validation_fraction=0.25).test.images.equal(tuning.test.images)  # fixed by the seed
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        factory(validation_fraction=1.0)
