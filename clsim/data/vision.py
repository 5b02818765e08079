"""File-backed vision sources: CIFAR-10/100 (torchvision), ImageNet-R, Tiny-ImageNet, image folders.

Nothing here downloads unless asked (``download: true``, CIFAR only) and nothing is read until a
source is built. Missing data is a :class:`~clsim.errors.DataNotFoundError` that names the
absolute path clsim looked at and how to get the data. Every data set exposes ``targets``
without decoding a single image.

ImageNet-R, Tiny-ImageNet and image folders share one pipeline: list the files (sorted, so the
split is reproducible), split them stratified per class when the data set has no test split of
its own (ImageNet-R can read a published split's two lists instead: :func:`published_split`),
and wrap the ``(path, label)`` lists in :class:`ImageListDataset` with ImageNet-style
transforms. torchvision is imported lazily so that ``clsim list`` and ``clsim validate`` stay
fast.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from clsim.data.base import Source, stratified_split
from clsim.errors import ConfigError, DataNotFoundError
from clsim.registry import DATASETS

DEFAULT_ROOT = "~/.cache/clsim/data"
"""Where data sets live when neither ``root`` nor the ``CLSIM_DATA`` variable says otherwise."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Pretrained weights expect the normalisation they were trained with: timm's ViT-B/16
# (augreg) uses "inception" (0.5, 0.5); CODA-Prompt's ImageNet-R code uses none (0, 1).
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
Normalization = Literal["imagenet", "inception", "none"]
CIFAR_STATS = {  # per-channel mean and std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

Transform = Callable[[Any], Any]
Samples = list[tuple[str, int]]


def data_root(root: str | None = None) -> Path:
    """The absolute data folder: ``root``, else ``$CLSIM_DATA``, else ``~/.cache/clsim/data``.

    ``~`` and ``$VARS`` in the path are expanded.
    """
    if root is None:
        root = os.environ.get("CLSIM_DATA") or DEFAULT_ROOT
    return Path(os.path.expandvars(os.path.expanduser(root))).resolve()


# --------------------------------------------------------------------------- datasets + transforms


class ImageListDataset(Dataset):
    """Images read from disk by path: ``(transform(RGB PIL image), label)`` per item.

    Args:
        samples: ``(path, label)`` pairs, in a fixed order.
        transform: applied to each RGB PIL image (grey and RGBA files are converted to RGB).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], *, transform: Transform | None = None):
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        image = default_loader(path)
        return (self.transform(image) if self.transform else image), label


def cifar_transforms(
    mean: Sequence[float], std: Sequence[float], *, image_size: int, augment: bool
) -> tuple[Transform, Transform]:
    """``(train, test)`` transforms for 32x32 images: pad-4 random crop and flip when ``augment``.

    Images are resized to ``image_size`` after cropping when it is not 32 (e.g. 224 for a
    pretrained ViT).
    """
    from torchvision import transforms as T

    resize = [T.Resize(image_size)] if image_size != 32 else []
    tail = [*resize, T.ToTensor(), T.Normalize(mean, std)]
    test = T.Compose(tail)
    if not augment:
        return test, test
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *tail]), test


def imagenet_transforms(
    *, image_size: int, augment: bool, normalize: Normalization = "imagenet"
) -> tuple[Transform, Transform]:
    """``(train, test)`` ImageNet-style transforms.

    Train: random-resized crop to ``image_size`` and flip (when ``augment``). Test: resize the
    short side to ``image_size * 256 / 224`` and centre-crop ``image_size``. Both end with the
    ``normalize`` entry of :data:`NORMALIZATIONS`.
    """
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(*NORMALIZATIONS[normalize])]
    test = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), *tail])
    if not augment:
        return test, test
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *tail]), test


def image_list_source(
    name: str,
    train: Samples,
    test: Samples,
    class_names: Sequence[str],
    *,
    image_size: int,
    augment: bool,
    normalize: Normalization,
) -> Source:
    """A Source over ``(path, label)`` lists with :func:`imagenet_transforms`."""
    train_tf, test_tf = imagenet_transforms(image_size=image_size, augment=augment, normalize=normalize)
    return Source(
        name=name,
        train=ImageListDataset(train, transform=train_tf),
        test=ImageListDataset(test, transform=test_tf),
        class_names=tuple(class_names),
        input_shape=(3, image_size, image_size),
    )


# --------------------------------------------------------------------------- listing and splitting


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; hidden files (``._x.jpg``) skipped."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def subfolders(folder: Path) -> list[str]:
    """Names of the visible sub-folders of ``folder``, sorted."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_class_folders(
    folder: Path, classes: Sequence[str] | None = None
) -> tuple[list[str], Samples]:
    """``(class names, (path, label) samples)`` of a class-per-folder tree.

    ``classes`` fixes the label order (e.g. the train tree's, when scanning the test tree);
    a folder that is not one of them is an error. Default: the sorted sub-folder names.
    """
    found = subfolders(folder)
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise ConfigError("data.root", f"expected at least 2 class folders in {folder}, "
                                           f"found {len(classes)}: {found}")
    label = {c: i for i, c in enumerate(classes)}
    samples: Samples = []
    for c in found:
        if c not in label:
            raise ConfigError("data.root", f"class folder {folder / c} is not one of the training "
                                           f"classes ({len(classes)} folders)")
        files = list_images(folder / c)
        if not files:
            raise DataNotFoundError("data.root", f"class folder {folder / c} holds no images "
                                                 f"({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(str(f), label[c]) for f in files]
    return list(classes), samples


def split_samples(
    samples: Samples, class_names: Sequence[str], *, test_fraction: float, split_seed: int
) -> tuple[Samples, Samples]:
    """``(train, test)``: ``test_fraction`` of each class held out at random, fixed by the seed.

    ``samples`` must be in a fixed (sorted) order for the split to be reproducible.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError("data.test_fraction", f"expected a number in (0, 1), got {test_fraction}")
    targets = np.array([y for _, y in samples], dtype=np.int64)
    counts = np.bincount(targets, minlength=len(class_names))
    if counts.min() < 2:
        c = int(counts.argmin())
        raise ConfigError("data.root", f"class '{class_names[c]}' has {counts[c]} image(s); "
                                       f"a train/test split needs at least 2 per class")
    train_idx, test_idx = stratified_split(targets, test_fraction, split_seed)
    return [samples[i] for i in train_idx], [samples[i] for i in test_idx]


def check_image_size(image_size: int) -> None:
    """A ConfigError unless ``image_size`` is a positive int."""
    if image_size < 1:
        raise ConfigError("data.image_size", f"expected an int >= 1, got {image_size}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------- CIFAR


def _cifar(
    name: str, *, root: str | None, download: bool, image_size: int, augment: bool
) -> Source:
    from torchvision import datasets

    check_image_size(image_size)
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    base = data_root(root)
    folder = base / cls.base_folder
    if not download and not folder.is_dir():
        raise DataNotFoundError("data.root", (
            f"{name} not found: looked for {folder}; set `download: true` (needs internet) or "
            f"place the '{cls.base_folder}' folder (extracted from {cls.url}) under {base}"))
    mean, std = CIFAR_STATS[name]
    train_tf, test_tf = cifar_transforms(mean, std, image_size=image_size, augment=augment)
    train = _load_cifar(cls, base, train=True, transform=train_tf, download=download)
    test = _load_cifar(cls, base, train=False, transform=test_tf, download=False)
    return Source(name=name, train=train, test=test, class_names=tuple(train.classes),
                  input_shape=(3, image_size, image_size))


def _load_cifar(
    cls: Any, base: Path, *, train: bool, transform: Transform, download: bool
) -> Any:
    """torchvision's CIFAR data set, its failures turned into one-line DataNotFoundErrors."""
    folder = base / cls.base_folder
    try:
        return cls(str(base), train=train, transform=transform, download=download)
    except (RuntimeError, OSError, tarfile.TarError, EOFError) as exc:  # URLError is an OSError
        why = _one_line(exc)
        if download:
            message = (f"download of {cls.url} to {base} failed ({why}); check the internet "
                       f"connection, or place the '{cls.base_folder}' folder under {base} by hand")
        elif isinstance(exc, RuntimeError):  # torchvision: a file is missing or fails its md5
            message = (f"{folder} is incomplete or corrupted ({why}); delete it and set "
                       f"`download: true`, or extract {cls.url} under {base} again")
        else:
            message = f"cannot read {folder}: {why}"
        raise DataNotFoundError("data.root", message) from exc


@DATASETS.register("cifar10")
def cifar10(
    *, root: str | None = None, download: bool = False, image_size: int = 32, augment: bool = True
) -> Source:
    """CIFAR-10 (torchvision): 60,000 32x32 colour images, 10 classes, official train/test split.

    Args:
        root: folder holding ``cifar-10-batches-py`` (default: ``$CLSIM_DATA`` or
            ``~/.cache/clsim/data``).
        download: download the archive into ``root`` when it is not there (needs internet).
        image_size: side the images are resized to (32 keeps the originals; 224 for a
            pretrained ViT).
        augment: random crop (pad 4) and horizontal flip of training images.
    """
    return _cifar("cifar10", root=root, download=download, image_size=image_size, augment=augment)


cifar10.num_classes = 10


@DATASETS.register("cifar100")
def cifar100(
    *, root: str | None = None, download: bool = False, image_size: int = 32, augment: bool = True
) -> Source:
    """CIFAR-100 (torchvision): 60,000 32x32 colour images, 100 classes, official train/test split.

    Args:
        root: folder holding ``cifar-100-python`` (default: ``$CLSIM_DATA`` or
            ``~/.cache/clsim/data``).
        download: download the archive into ``root`` when it is not there (needs internet).
        image_size: side the images are resized to (32 keeps the originals; 224 for a
            pretrained ViT).
        augment: random crop (pad 4) and horizontal flip of training images.
    """
    return _cifar("cifar100", root=root, download=download, image_size=image_size, augment=augment)


cifar100.num_classes = 100


# --------------------------------------------------------------------------- ImageNet-R


def _imagenet_r_folder(base: Path) -> Path:
    """``base/imagenet-r``, or ``base`` itself when it holds the wnid class folders."""
    if (base / "imagenet-r").is_dir():
        return base / "imagenet-r"
    if base.is_dir() and any(re.fullmatch(r"n\d{8}", d) for d in subfolders(base)):
        return base
    raise DataNotFoundError("data.root", (
        f"ImageNet-R not found: looked for {base / 'imagenet-r'} (and for wnid class folders "
        f"n########/ in {base}); download {IMAGENET_R_URL} and extract it under {base} so that "
        f"{base / 'imagenet-r'}/<wnid>/*.jpg exist"))


# A published split: the CODA-Prompt protocol's lists (GT-RIPL/CODA-Prompt, dataloaders/splits/
# imagenet-r_{train,test}.yaml, read by dataloaders/dataloader.py:iIMAGENET_R.load).
SPLIT_FORMAT = ("a YAML mapping with 'data' (a list of image paths ending in <wnid>/<file>) and "
                "optionally 'targets' (one int label per path), as CODA-Prompt's "
                "dataloaders/splits/imagenet-r_train.yaml")
Entry = tuple[int, str, int | None]  # (line in the file, '<wnid>/<file>', label or None)


def find_split_file(spec: str, base: Path, key: str) -> Path:
    """The split file ``spec``: as given when absolute, else from the working directory, else
    under the data root ``base`` (where the ImageNet-R folder is)."""
    path = Path(os.path.expandvars(os.path.expanduser(spec)))
    places = [path] if path.is_absolute() else list(dict.fromkeys([Path.cwd() / path, base / path]))
    for place in places:
        if place.is_file():
            return place.resolve()
    raise DataNotFoundError(key, f"split file not found: looked for "
                                 f"{' and '.join(str(p) for p in places)}; expected {SPLIT_FORMAT}")


def _compose(path: Path, key: str) -> Any:
    """The YAML node tree of ``path`` (nodes keep their line numbers, values do not)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster on 24,000 lines
    try:
        return yaml.compose(path.read_bytes().decode("utf-8"), Loader=loader)
    except OSError as exc:
        raise ConfigError(key, f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path}: not a text file (UTF-8); expected {SPLIT_FORMAT}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or _one_line(exc)).split())
        raise ConfigError(key, f"{path}{where}: not valid YAML ({problem}); expected {SPLIT_FORMAT}") from None


def read_split_list(path: Path, key: str) -> list[Entry]:
    """The entries of one split file: ``(line, '<wnid>/<file>', label or None)``, in file order.

    Format (CODA-Prompt's)::

        data:
        - data/imagenet-r/n02128757/sculpture_4.jpg
        ...
        targets:
        - 177
        ...

    Only the last two components of each path count (``<wnid>/<file>``): the code's paths
    start with its own ``data/imagenet-r/``, and clsim looks the image up in its ImageNet-R
    folder. ``targets`` (optional) is one int label per path.
    """
    import yaml

    root = _compose(path, key)
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(key, f"{path}: expected {SPLIT_FORMAT}, got "
                               f"{'an empty file' if root is None else 'no mapping'}")
    sections = {k.value if isinstance(k, yaml.ScalarNode) else "(a non-scalar key)": v for k, v in root.value}
    unknown = sorted(set(sections) - {"data", "targets"})
    if "data" not in sections or unknown:
        what = f"unknown key '{unknown[0]}'" if unknown else "no 'data' key"
        raise ConfigError(key, f"{path}: {what}; expected {SPLIT_FORMAT}")
    paths = _sequence(path, key, sections["data"], "data")
    labels = _sequence(path, key, sections["targets"], "targets") if "targets" in sections else None
    if not paths:
        raise ConfigError(key, f"{path}: 'data' lists no images; expected {SPLIT_FORMAT}")
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(key, f"{path}: {len(paths)} paths in 'data' but {len(labels)} labels "
                               f"in 'targets'; expected one label per path")
    entries = [(item.start_mark.line + 1, _entry_path(path, key, item), None) for item in paths]
    if labels is None:
        return entries
    return [(line, rel, _entry_label(path, key, item)) for (line, rel, _), item in zip(entries, labels)]


def _sequence(path: Path, key: str, node: Any, name: str) -> list[Any]:
    import yaml

    if not isinstance(node, yaml.SequenceNode):
        raise ConfigError(key, f"{path}, line {node.start_mark.line + 1}: '{name}' is not a list; "
                               f"expected {SPLIT_FORMAT}")
    return node.value


def _entry_path(path: Path, key: str, item: Any) -> str:
    """``'<wnid>/<file>'`` of one ``data`` item; a ConfigError naming the line otherwise."""
    import yaml

    parts = str(item.value).replace("\\", "/").split("/") if isinstance(item, yaml.ScalarNode) else []
    if item.tag != "tag:yaml.org,2002:str" or len(parts) < 2 or not parts[-1] or not parts[-2]:
        raise ConfigError(key, f"{path}, line {item.start_mark.line + 1}: expected an image path "
                               f"ending in <wnid>/<file>, got {_node_text(item)}")
    return f"{parts[-2]}/{parts[-1]}"


def _entry_label(path: Path, key: str, item: Any) -> int:
    import yaml

    text = item.value if isinstance(item, yaml.ScalarNode) else ""
    if item.tag != "tag:yaml.org,2002:int" or not re.fullmatch(r"\+?\d+", text):
        raise ConfigError(key, f"{path}, line {item.start_mark.line + 1}: expected a label "
                               f"(an int >= 0) in 'targets', got {_node_text(item)}")
    return int(text)


def _node_text(node: Any) -> str:
    return repr(node.value) if isinstance(node.value, str) else f"a {node.id}"


def published_split(
    folder: Path, base: Path, train_list: str, test_list: str
) -> tuple[list[str], Samples, Samples]:
    """``(class names, train, test)`` of ImageNet-R as two split files list them.

    Every listed image must be in ``folder`` (``<wnid>/<file>``), none listed twice, none in
    both lists. Labels: the files' ``targets`` (one wnid per label, labels 0..K-1) when both
    have them, else the index of the wnid among the training list's sorted wnids.
    """
    files = {k: find_split_file(spec, base, f"data.{k}")
             for k, spec in (("train_list", train_list), ("test_list", test_list))}
    lists = {k: read_split_list(path, f"data.{k}") for k, path in files.items()}
    present = _class_folder_files(folder)
    seen: dict[str, tuple[Path, int]] = {}
    for k, entries in lists.items():
        _check_entries(files[k], f"data.{k}", entries, folder, present, seen)
    if (lists["train_list"][0][2] is None) != (lists["test_list"][0][2] is None):
        raise ConfigError("data.test_list", f"one split file has 'targets' and the other not "
                                            f"({files['train_list']}, {files['test_list']}); "
                                            f"give labels in both or in neither")
    classes, label = _split_labels(files, lists)
    train, test = ([(str(folder / rel), label(k, line, rel, y)) for line, rel, y in lists[k]]
                   for k in ("train_list", "test_list"))
    return classes, train, test


def _class_folder_files(folder: Path) -> set[str]:
    """``'<wnid>/<file>'`` of every image directly in a class folder (listdir: 30x faster than
    :func:`list_images` on ImageNet-R's 30,000 files)."""
    return {f"{d}/{f}" for d in subfolders(folder) for f in os.listdir(folder / d)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS}


def _check_entries(path: Path, key: str, entries: list[Entry], folder: Path, present: set[str],
                   seen: dict[str, tuple[Path, int]]) -> None:
    """Every entry's image exists and is listed once over both files."""
    missing = [(line, rel) for line, rel, _ in entries if rel not in present]
    if missing:
        line, rel = missing[0]
        more = f" ({len(missing) - 1} more of its {len(entries)} images are missing too)" if len(missing) > 1 else ""
        raise DataNotFoundError(key, f"{path}, line {line}: image {folder / rel} not found{more}; "
                                     f"expected the ImageNet-R folder the split was made from")
    for line, rel, _ in entries:
        if rel in seen:
            other, first = seen[rel]
            where = "earlier in this file" if other == path else f"in {other}"
            raise ConfigError(key, f"{path}, line {line}: {rel} is listed again (line {first}, "
                                   f"{where}); expected every image once in one of the two lists")
        seen[rel] = (path, line)


def _split_labels(files: dict[str, Path], lists: dict[str, list[Entry]]) -> tuple[list[str], Callable]:
    """``(class names, label(list key, line, rel, given label))`` for the two lists."""
    if lists["train_list"][0][2] is not None:
        return _given_labels(files, lists), lambda k, line, rel, y: y
    classes = sorted({rel.split("/")[0] for _, rel, _ in lists["train_list"]})
    index = {c: i for i, c in enumerate(classes)}

    def by_folder(k: str, line: int, rel: str, _: Any) -> int:
        wnid = rel.split("/")[0]
        if wnid not in index:
            raise ConfigError(f"data.{k}", f"{files[k]}, line {line}: class {wnid} has no image "
                                           f"in the training list {files['train_list']}")
        return index[wnid]
    return classes, by_folder


def _given_labels(files: dict[str, Path], lists: dict[str, list[Entry]]) -> list[str]:
    """Class names by the files' ``targets``: one wnid per label, one label per wnid, 0..K-1."""
    first: dict[Any, tuple[Any, str, int]] = {}  # label -> (wnid, key, line) and wnid -> (label, ...)
    for k, entries in lists.items():
        for line, rel, y in entries:
            wnid = rel.split("/")[0]
            for this, that in ((y, wnid), (wnid, y)):
                other, other_k, other_line = first.setdefault(this, (that, k, line))
                if other != that:
                    raise ConfigError(f"data.{k}", f"{files[k]}, line {line}: {wnid} has label {y}, "
                                                   f"but {files[other_k]}, line {other_line} pairs "
                                                   f"{this} with {other}; expected one label per class folder")
    labels = sorted(y for y in first if isinstance(y, int))
    if labels != list(range(len(labels))):
        gap = min(set(range(len(labels) + 1)) - set(labels))
        raise ConfigError("data.train_list", f"the 'targets' of {files['train_list']} and "
                                             f"{files['test_list']} skip label {gap}; expected 0..K-1 for K classes")
    return [first[y][0] for y in labels]


@DATASETS.register("imagenet_r")
def imagenet_r(
    *,
    root: str | None = None,
    image_size: int = 224,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    train_list: str | None = None,
    test_list: str | None = None,
    augment: bool = True,
    normalize: Normalization = "imagenet",
) -> Source:
    """ImageNet-R: 30,000 renditions (art, cartoons, ...) of 200 ImageNet classes, 80/20 split.

    Default split: a random 20 % of each class held out, fixed by ``split_seed`` (clsim's own
    draw). ``train_list`` + ``test_list`` instead read a published split, the CODA-Prompt
    protocol's ``dataloaders/splits/imagenet-r_{train,test}.yaml`` (24,000 / 6,000 images;
    Smith et al., CVPR 2023, and "A Closer Look at Rehearsal-Free Continual Learning"): see
    :func:`read_split_list` for the format. With a ``targets`` list in the files their labels
    are used as they are, so ``scenario.class_order: sorted`` gives the code's task order at
    its seed 0.

    Args:
        root: folder holding ``imagenet-r/<wnid>/*.jpg``, or the ``imagenet-r`` folder itself
            (default: ``$CLSIM_DATA`` or ``~/.cache/clsim/data``).
        image_size: side of the square crops the model sees.
        test_fraction: share of each class held out for testing (seeded split only).
        split_seed: seed of the stratified train/test split (seeded split only).
        train_list: the published split's training list (YAML with ``data`` and optionally
            ``targets``); a relative path is looked for in the working directory, then in the
            data root. Give it together with ``test_list``.
        test_list: the published split's test list, same format.
        augment: random-resized crop and horizontal flip of training images.
        normalize: 'imagenet' (ImageNet mean/std), 'inception' (0.5/0.5, timm's ViT-B/16
            weights) or 'none'; match the pretrained weights' own.
    """
    check_image_size(image_size)
    base = data_root(root)
    if (train_list is None) != (test_list is None):
        missing = "data.test_list" if test_list is None else "data.train_list"
        raise ConfigError(missing, "missing: give both train_list and test_list (a published "
                                   "split, e.g. CODA-Prompt's imagenet-r_train.yaml and "
                                   "imagenet-r_test.yaml), or neither for the seeded split")
    folder = _imagenet_r_folder(base)
    if train_list is not None and test_list is not None:
        classes, train, test = published_split(folder, base, train_list, test_list)
    else:
        classes, samples = scan_class_folders(folder)
        train, test = split_samples(
            samples, classes, test_fraction=test_fraction, split_seed=split_seed
        )
    return image_list_source(
        "imagenet_r", train, test, classes, image_size=image_size, augment=augment,
        normalize=normalize,
    )


imagenet_r.num_classes = 200


# --------------------------------------------------------------------------- Tiny-ImageNet


def _tiny_imagenet_folder(base: Path) -> Path:
    """``base/tiny-imagenet-200``, or ``base`` itself when it holds ``train/`` and ``val/``."""
    for folder in (base / "tiny-imagenet-200", base):
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            return folder
    raise DataNotFoundError("data.root", (
        f"Tiny-ImageNet not found: looked for {base / 'tiny-imagenet-200'}/train and /val; "
        f"download {TINY_IMAGENET_URL} and extract it under {base} so that "
        f"{base / 'tiny-imagenet-200'}/train/<wnid>/images/*.JPEG and "
        f"val/val_annotations.txt exist"))


def _tiny_imagenet_val(folder: Path, classes: Sequence[str]) -> Samples:
    """The official validation split, labelled by ``val/val_annotations.txt``."""
    annotations, images = folder / "val" / "val_annotations.txt", folder / "val" / "images"
    if not annotations.is_file() or not images.is_dir():
        raise DataNotFoundError("data.root", f"Tiny-ImageNet test split not found: expected "
                                             f"{annotations} and {images}/")
    label, present = {c: i for i, c in enumerate(classes)}, set(os.listdir(images))
    samples: Samples = []
    for n, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label or fields[0] not in present:
            raise DataNotFoundError("data.root", f"{annotations}, line {n}: expected '<file "
                                                 f"in {images}>\\t<known wnid>', got {line!r}")
        samples.append((str(images / fields[0]), label[fields[1]]))
    return samples


@DATASETS.register("tiny_imagenet")
def tiny_imagenet(
    *, root: str | None = None, image_size: int = 64, augment: bool = True,
    normalize: Normalization = "imagenet",
) -> Source:
    """Tiny-ImageNet: 110,000 64x64 images of 200 classes; the official val split is the test set.

    Args:
        root: folder holding ``tiny-imagenet-200``, or that folder itself (default:
            ``$CLSIM_DATA`` or ``~/.cache/clsim/data``).
        image_size: side of the square crops the model sees.
        augment: random-resized crop and horizontal flip of training images.
        normalize: 'imagenet' (ImageNet mean/std), 'inception' (0.5/0.5, timm's ViT-B/16
            weights) or 'none'; match the pretrained weights' own.
    """
    check_image_size(image_size)
    folder = _tiny_imagenet_folder(data_root(root))
    wnids = folder / "wnids.txt"
    classes = wnids.read_text().split() if wnids.is_file() else None
    missing = sorted(set(classes or ()) - set(subfolders(folder / "train")))
    if missing:
        raise DataNotFoundError("data.root", f"{len(missing)} class(es) of {wnids} have no "
                                             f"folder in {folder / 'train'}, e.g. {missing[0]}")
    classes, train = scan_class_folders(folder / "train", classes)
    test = _tiny_imagenet_val(folder, classes)
    return image_list_source(
        "tiny_imagenet", train, test, classes, image_size=image_size, augment=augment,
        normalize=normalize,
    )


tiny_imagenet.num_classes = 200


# --------------------------------------------------------------------------- any image folder


@DATASETS.register("image_folder")
def image_folder(
    *,
    root: str,
    image_size: int = 224,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    augment: bool = True,
    normalize: Normalization = "imagenet",
) -> Source:
    """Any class-per-folder image tree, with its own train/ and test/ or split stratified.

    Layouts: ``root/train/<class>/*`` and ``root/test/<class>/*`` when both exist (labels
    follow the sorted train folders); otherwise ``root/<class>/*``, split per class.

    Args:
        root: the tree's top folder (``~`` and ``$VARS`` are expanded).
        image_size: side of the square crops the model sees.
        test_fraction: share of each class held out for testing (single-tree layout only).
        split_seed: seed of the stratified train/test split (single-tree layout only).
        augment: random-resized crop and horizontal flip of training images.
        normalize: 'imagenet' (ImageNet mean/std), 'inception' (0.5/0.5, timm's ViT-B/16
            weights) or 'none'; match the pretrained weights' own.
    """
    check_image_size(image_size)
    folder = data_root(root)
    if not folder.is_dir():
        raise DataNotFoundError("data.root", f"no folder at {folder}; expected <class>/<image> "
                                             f"sub-folders, or train/ and test/ holding them")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        classes, train = scan_class_folders(folder / "train")
        _, test = scan_class_folders(folder / "test", classes)
    else:
        classes, samples = scan_class_folders(folder)
        train, test = split_samples(
            samples, classes, test_fraction=test_fraction, split_seed=split_seed
        )
    return image_list_source(
        "image_folder", train, test, classes, image_size=image_size, augment=augment,
        normalize=normalize,
    )
