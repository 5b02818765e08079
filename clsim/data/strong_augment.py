"""DeiT's strong augmentation on batches of normalised tensors, with timm's implementations.

DeiT (Touvron et al. 2021) and DeiT-LT (Rangwani et al. 2024) train ViTs with RandAugment
(``rand-m9-mstd0.5-inc1``), Mixup (alpha 0.8) / CutMix (alpha 1.0) with label smoothing 0.1,
and random erasing (p 0.25, per-pixel noise). clsim's data arrive as normalised
``(B, C, H, W)`` batches, so :class:`StrongAugment` maps each image to 8-bit for timm's
PIL-based RandAugment and back to its own value range, then erases; :class:`BatchMixup` wraps
timm's ``Mixup`` for batches of any size.

timm's RandAugment draws from Python's ``random`` and Mixup from NumPy's global generator:
:func:`seed_global_generators` reseeds both from torch's generator, which the engine seeds
per experience, so a resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing

# Pillow >= 10 refuses posterize to 0 bits, which timm's increasing posterize reaches at
# magnitude 10; capping the magnitude at 9 (mmax9) keeps DeiT's policy otherwise unchanged.
DEIT_RANDAUGMENT = "rand-m9-mstd0.5-inc1-mmax9"


def seed_global_generators() -> None:
    """Reseed ``random`` and NumPy from torch's global generator (see the module docstring)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    random.seed(seed)
    np.random.seed(seed)


class StrongAugment:
    """RandAugment then random erasing, per image, on a normalised batch.

    Args:
        randaugment: timm RandAugment config string ('' for none).
        erase_prob: random-erasing probability per image (0 for none).
    """

    def __init__(self, *, randaugment: str = DEIT_RANDAUGMENT, erase_prob: float = 0.25):
        self.randaugment = rand_augment_transform(randaugment, {"img_mean": (124, 116, 104)}) if randaugment else None
        self.erase_prob = erase_prob

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.randaugment is not None:
            x = torch.stack([self._randaugment(img) for img in x.cpu()]).to(x.device)
        if self.erase_prob > 0:
            x = RandomErasing(self.erase_prob, mode="pixel", device=str(x.device))(x.clone())
        return x

    def _randaugment(self, img: torch.Tensor) -> torch.Tensor:
        """One ``(C, H, W)`` image through RandAugment, in 8 bits over its own min..max range.

        timm's ops fill with an RGB colour, so a grey image goes through as RGB and comes back
        as its luminance.
        """
        low, high = img.min(), img.max()
        scale = (high - low).clamp_min(1e-8)
        pixels = ((img - low) / scale * 255).round().byte().permute(1, 2, 0).numpy()  # (H, W, C)
        grey = pixels.shape[2] == 1
        pil = Image.fromarray(pixels[:, :, 0]).convert("RGB") if grey else Image.fromarray(pixels)
        out = self.randaugment(pil)
        out = torch.from_numpy(np.array(out.convert("L") if grey else out))  # (H, W[, 3]) uint8
        out = out.reshape(*out.shape[:2], -1).permute(2, 0, 1).float()  # (C, H, W)
        return out / 255 * scale + low


class BatchMixup:
    """timm's Mixup / CutMix for a batch of any size, returning soft targets ``(B, classes)``.

    timm mixes a batch with its reverse and needs an even size; an odd batch mixes all but its
    last image, which keeps its own (smoothed) label.
    """

    def __init__(self, num_classes: int, *, mixup: float = 0.8, cutmix: float = 1.0, label_smoothing: float = 0.1):
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mix = None
        if mixup > 0 or cutmix > 0:
            self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                             num_classes=num_classes)

    def smooth(self, y: torch.Tensor) -> torch.Tensor:
        """Labels ``(B,)`` as smoothed one-hot targets ``(B, classes)``, unmixed."""
        return mixup_target(y, self.num_classes, 1.0, self.smoothing)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        even = len(x) - len(x) % 2
        if self.mix is None or even == 0:
            return x, self.smooth(y)
        x = x.clone()  # timm mixes in place; the caller's batch stays as it was
        x_mixed, y_mixed = self.mix(x[:even], y[:even])
        if even == len(x):
            return x_mixed, y_mixed
        return torch.cat([x_mixed, x[even:]]), torch.cat([y_mixed, self.smooth(y[even:])])
