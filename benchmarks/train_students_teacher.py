"""Train the Uninformed Students teachers shipped in flawmap (src/flawmap/weights/students_teacher.safetensors).

One teacher per patch size (17, 33, 65 px; :class:`flawmap.models.students.PatchNetwork`), trained
once and category-agnostic, as in the paper (Bergmann et al., CVPR 2020, Sec. 3.1):

- data: random patches of the photographs that ship with scikit-image (``skimage.data``; no
  download; no ImageNet here): for each patch a random image, a side of ``p`` times a
  log-uniform factor in [1/2, 2], a random position, flips, a quarter-turn rotation and a
  brightness / contrast / saturation jitter, resized to ``p x p`` (antialiased bilinear);
- target: the descriptor of the same patch by the pretrained network, here the default
  backbone's (EfficientNet-Lite0, packaged ImageNet weights): the patch resized to
  ``TARGET_SIZE`` px, its stride-8 and stride-16 stages (flawmap's default taps) averaged over
  the positions and concatenated (40 + 112 = 152 values), standardised per value over the
  patches. The paper distils ResNet-18's 512-d output; ResNet-18's ImageNet weights are not
  available offline here;
- loss: knowledge distillation (the paper's L_k): ``||D(T(p)) - t(p)||^2`` with a learned linear decoder
  ``D`` from the 128-d descriptor to the target (used in training only); plus the decorrelation
  (compactness) loss L_c, weighted ``--decorrelation-weight``, over the batch's correlation matrix of the
  descriptor's channels: the sum of the SQUARED off-diagonal coefficients (the paper writes the
  plain sum, which anti-correlated channels minimise as well as uncorrelated ones); and,
  optional (``--triplet-weight``, 0 by default), the triplet (metric-learning) loss L_m with the augmented
  patch (shifted by up to ``p / 8``, new jitter) as positive and another random patch as negative;
- the patches and their targets are drawn once (fixed by ``--seed``), then ``--epochs`` epochs of
  Adam in a seeded order.

Deterministic: one CPU thread, ``torch.use_deterministic_algorithms``, every draw from one seeded
generator; the same command, torch and scikit-image versions give the same file bit for bit.
Width: ``--width`` (16 by default) channels where the paper has 128 (twice that where it has
256): the students' dense evaluation at every pixel of a 256 px image runs 4 networks per patch
size on a CPU (see flawmap.models.students).

    OMP_NUM_THREADS=1 python benchmarks/train_students_teacher.py            # the shipped file
    python benchmarks/train_students_teacher.py --patches 256 --epochs 1 --output /tmp/t.safetensors
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from flawmap.backbones import create_backbone
from flawmap.models.students import PATCH_SIZES, PatchNetwork, TEACHER_FILE

#: scikit-image photographs available offline (``skimage.data`` without pooch downloads).
IMAGES = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "rocket", "clock", "cell", "page", "text",
)
#: Side in pixels at which the backbone describes a patch.
TARGET_SIZE = 64
#: Backbone stages whose position-averaged features are the target (stride 8 and 16).
TARGET_TAPS = ("stage3", "stage5")
TRIPLET_MARGIN = 1.0


def photographs() -> list[torch.Tensor]:
    """The scikit-image photographs as ``3 x H x W`` float tensors in [0, 1] (grey as RGB)."""
    import skimage.data

    result = []
    for name in IMAGES:
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        result.append(torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1).contiguous())
    return result


def draw_patch(images: list[torch.Tensor], size: int, generator: torch.Generator, source: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """One augmented patch ``3 x size x size`` and where it came from (image, top, left, side);
    with ``source``, the same region shifted by up to ``size / 8`` (the triplet's positive)."""
    def uniform() -> float:
        return float(torch.rand((), generator=generator))

    if source is None:
        index = int(torch.randint(len(images), (), generator=generator))
        image = images[index]
        side = min(round(size * math.exp(math.log(2.0) * (2.0 * uniform() - 1.0))), *image.shape[1:])
        top = int(torch.randint(image.shape[1] - side + 1, (), generator=generator))
        left = int(torch.randint(image.shape[2] - side + 1, (), generator=generator))
    else:
        index, top, left, side = source
        image = images[index]
        shift = max(side // 8, 1)
        top = min(max(top + int(torch.randint(-shift, shift + 1, (), generator=generator)), 0), image.shape[1] - side)
        left = min(max(left + int(torch.randint(-shift, shift + 1, (), generator=generator)), 0), image.shape[2] - side)
    patch = image[:, top : top + side, left : left + side]
    if uniform() < 0.5:
        patch = patch.flip(2)
    if uniform() < 0.5:
        patch = patch.flip(1)
    patch = torch.rot90(patch, int(torch.randint(4, (), generator=generator)), dims=(1, 2))
    patch = nn.functional.interpolate(patch[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    grey = patch.mean(dim=0, keepdim=True)
    patch = grey + (patch - grey) * (0.8 + 0.4 * uniform())  # saturation
    patch = patch.mean() + (patch - patch.mean()) * (0.8 + 0.4 * uniform())  # contrast
    patch = patch * (0.8 + 0.4 * uniform())  # brightness
    return patch.clamp(0.0, 1.0), (index, top, left, side)


def backbone_targets(backbone: nn.Module, patches: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Patches ``N x 3 x p x p`` in [0, 1] -> the backbone's descriptors ``N x 152`` (see docstring)."""
    rows = []
    with torch.inference_mode():
        for start in range(0, len(patches), batch_size):
            batch = nn.functional.interpolate(patches[start : start + batch_size], size=(TARGET_SIZE, TARGET_SIZE), mode="bilinear", antialias=True, align_corners=False)
            rows.append(torch.cat([level.mean(dim=(2, 3)) for level in backbone.features(batch, TARGET_TAPS)], dim=1))
    return torch.cat(rows)


def decorrelation_loss(descriptors: torch.Tensor) -> torch.Tensor:
    """L_c on a batch of descriptors ``B x d``: squared off-diagonal correlation coefficients, summed."""
    centred = descriptors - descriptors.mean(dim=0)
    scaled = centred / centred.square().mean(dim=0).add(1e-8).sqrt()
    correlation = scaled.T @ scaled / descriptors.shape[0]
    off_diagonal = correlation - torch.diag(torch.diagonal(correlation))
    return off_diagonal.square().sum()


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """L_m: ``max(0, margin + d+ - d-)`` with ``d-`` the smaller of anchor/positive to negative."""
    closer = (anchor - positive).square().sum(dim=1)
    farther = torch.minimum((anchor - negative).square().sum(dim=1), (positive - negative).square().sum(dim=1))
    return (TRIPLET_MARGIN + closer - farther).clamp_min(0.0).mean()


def train_teacher(patch_size: int, args: argparse.Namespace, images: list[torch.Tensor], backbone: nn.Module, seed: int) -> PatchNetwork:
    """One teacher, from its seed (see module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    drawn = [draw_patch(images, patch_size, generator) for _ in range(args.patches)]
    patches = torch.stack([patch for patch, _ in drawn])
    positives = torch.stack([draw_patch(images, patch_size, generator, source)[0] for _, source in drawn]) if args.triplet_weight else None
    targets = backbone_targets(backbone, patches)
    targets = (targets - targets.mean(dim=0)) / targets.std(dim=0).clamp_min(1e-6)
    torch.manual_seed(seed)
    teacher = PatchNetwork(patch_size, args.width, args.descriptor_dim)
    decoder = nn.Linear(args.descriptor_dim, targets.shape[1])
    optimizer = torch.optim.Adam([*teacher.parameters(), *decoder.parameters()], lr=args.learning_rate, weight_decay=args.weight_decay)
    mean, std = backbone.mean, backbone.std
    for epoch in range(args.epochs):
        order = torch.randperm(args.patches, generator=generator)
        total, start_time = 0.0, time.process_time()
        for start in range(0, args.patches, args.batch_size):
            rows = order[start : start + args.batch_size]
            descriptors = teacher((patches[rows] - mean) / std).flatten(1)
            loss = (decoder(descriptors) - targets[rows]).square().sum(dim=1).mean()  # L_k
            loss = loss + args.decorrelation_weight * decorrelation_loss(descriptors)
            if positives is not None:
                negatives = teacher((patches[rows.roll(1)] - mean) / std).flatten(1)
                positive = teacher((positives[rows] - mean) / std).flatten(1)
                loss = loss + args.triplet_weight * triplet_loss(descriptors, positive, negatives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        print(f"p={patch_size} epoch {epoch + 1}/{args.epochs}: loss {total / args.patches:.4f} ({time.process_time() - start_time:.0f} CPU s)", flush=True)
    return teacher.eval().requires_grad_(False)


def teacher_tensors(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Train every teacher; their weights as ``p<size>.<name>`` tensors."""
    torch.use_deterministic_algorithms(True)
    images = photographs()
    backbone = create_backbone("efficientnet_lite0", None)
    tensors = {}
    for offset, patch_size in enumerate(args.patch_sizes):
        teacher = train_teacher(patch_size, args, images, backbone, args.seed + offset)
        tensors.update({f"p{patch_size}.{name}": value.contiguous() for name, value in teacher.state_dict().items()})
    return tensors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=list(PATCH_SIZES))
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--descriptor-dim", type=int, default=128)
    parser.add_argument("--patches", type=int, default=8192, help="patches per teacher")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--decorrelation-weight", type=float, default=0.02)
    parser.add_argument("--triplet-weight", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "src" / "flawmap" / TEACHER_FILE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    tensors = teacher_tensors(args)
    metadata = {"width": str(args.width), "descriptor_dim": str(args.descriptor_dim), "seed": str(args.seed),
                "patches": str(args.patches), "epochs": str(args.epochs)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.output), metadata=metadata)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
