"""Merlin (Blankemeier et al. 2024, Stanford; StanfordMIMI/Merlin) behind our extractor API.

Architecture (written from the release's ``merlin/models/i3res.py`` + ``inflate.py`` of the
``merlin-vlm`` package, 0.0.7): an ImageNet ResNet-152 inflated to 3D (I3D):

* the input (B, 1, R, A, S) is permuted to (B, 1, S, R, A) - depth first, as the release's
  ``I3ResNet.forward`` does - and repeated to 3 channels;
* stem: Conv3d 3->64, kernel (3, 7, 7), stride (1, 2, 2), padding (1, 3, 3), no bias;
  BatchNorm; ReLU; MaxPool3d 3, stride 2, padding 1;
* four stages of torchvision-style bottlenecks ([3, 8, 36, 3] blocks, widths 64..512,
  expansion 4), every 3x3 conv inflated to 3x3x3 with padding 1 and the stage stride applied
  in all three axes (the release's ``time_stride=spatial_stride``);
* heads on the global-average-pooled 2048-d feature: ``classifier`` (1x1x1 conv to 1692
  phenotypes) and ``contrastive_head`` (1x1x1 conv to the 512-d CLIP image embedding).

Overall stride: 32 in-plane and 16 in depth, i.e. on Merlin's 1.5 x 1.5 x 3 mm grid one
feature cell is 48 mm in every direction; the 224 x 224 x 160 input gives a 7 x 7 x 10 map.

Embeddings: ``embedding: "image"`` (default) is the 2048-d average-pooled feature, what the
release returns with ``ImageEmbedding=True`` ("image-only embeddings", its documented
probing feature); ``"contrastive"`` is the 512-d ``contrastive_head`` output, L2-normalised
as the release's CLIP forward does (``MerlinArchitecture.forward``).

Preprocessing (release ``merlin/data/monai_transforms.py``): Orientation RAS (= our canonical
axes, nothing to permute), Spacing 1.5 x 1.5 x 3 mm (our ``spacing_mm``, so extraction
resamples there), ScaleIntensityRange [-1000, 1000] HU -> [0, 1] with clipping, SpatialPad
then CenterSpatialCrop to 224 x 224 x 160 (pad value 0, i.e. -1000 HU).

Patch tokens: the final feature map is resampled (trilinearly, through the exact geometry of
the crop/pad) onto our cubic patch grid of ``patch_size`` voxels (default 16: 24 x 24 x 48 mm
at Merlin's spacing, so depth tokens coincide with feature cells and in-plane tokens are
interpolated between them); tokens outside the 224 x 224 x 160 crop repeat the nearest cell.

``merlin-vlm`` cannot build the model offline (its ``Merlin()`` downloads the checkpoint, and
its builder downloads torchvision's ImageNet ResNet-152 and the Clinical-Longformer text
tower), so this module does not use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxelfm.errors import VoxelFMError
from voxelfm.extract.foreign.common import (
    AxisMap,
    ForeignExtractor,
    build_encoder_model,
    center_pad_or_crop,
    extractor_device,
    foreign_options,
    load_encoder_weights,
    sample_feature_grid,
    spacing_option,
    valid_box,
)

MODEL = "Merlin"
SPACING_MM = (1.5, 1.5, 3.0)
INPUT_SIZE = (224, 224, 160)  # (R, A, S) voxels
HU_WINDOW = (-1000.0, 1000.0)
DOWNLOAD_HINT = (
    "the Merlin checkpoint i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt "
    "from the Hugging Face repository stanfordmimi/Merlin"
)
# Release keys: MerlinArchitecture -> encode_image (ImageEncoder) -> i3_resnet (I3ResNet).
PREFIXES = ("module.", "model.", "encode_image.", "i3_resnet.")
IGNORE_PREFIXES = ("encode_text.", "logit_scale", "model.encode_text.", "model.logit_scale")
RESNET152_LAYERS = (3, 8, 36, 3)


class Bottleneck3d(nn.Module):
    """Inflated torchvision Bottleneck: 1x1x1 -> 3x3x3 (stride) -> 1x1x1, expansion 4."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv3d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class MerlinImageEncoder(nn.Module):
    """Merlin's I3D ResNet image encoder; state-dict keys as the release's ``i3_resnet``.

    Args:
        layers: bottleneck blocks per stage ((3, 8, 36, 3) = ResNet-152).
        width: channels of the stem (64); stage i has width * 2**i planes.
        num_phenotypes: outputs of the phenotype ``classifier`` head (1692).
        projection_dim: width of the contrastive head (512).
    """

    def __init__(
        self,
        layers: Sequence[int] = RESNET152_LAYERS,
        width: int = 64,
        num_phenotypes: int = 1692,
        projection_dim: int = 512,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        channels = width
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(int(blocks)):
                stage.append(Bottleneck3d(channels, planes, stride if block == 0 else 1))
                channels = planes * Bottleneck3d.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.feature_dim = channels
        self.classifier = nn.Conv3d(channels, num_phenotypes, 1)
        self.contrastive_head = nn.Conv3d(channels, projection_dim, 1)

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, 1, R, A, S) in [0, 1] -> (B, feature_dim, R/32, A/32, S/16) last-stage map."""
        x = x.permute(0, 1, 4, 2, 3)  # (B, 1, S, R, A): the release convolves depth first
        x = torch.cat((x, x, x), dim=1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return x.permute(0, 1, 3, 4, 2)  # back to (R, A, S)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 1, R, A, S) -> (2048-d pooled image embedding, 512-d contrastive embedding)."""
        pooled = self.feature_map(x).mean(dim=(2, 3, 4))
        contrastive = F.linear(pooled, self.contrastive_head.weight.flatten(1))
        return pooled, contrastive + self.contrastive_head.bias


def preprocess(
    hu: Tensor, input_size: Sequence[int] = INPUT_SIZE, maps: list[AxisMap] | None = None
) -> Tensor:
    """(1, X, Y, Z) canonical HU -> (1, *input_size) Merlin input in [0, 1] (see module doc).

    ``maps`` (per axis, our voxel -> model input voxel) are updated for the centre pad/crop.
    """
    low, high = HU_WINDOW
    x = (hu.clamp(low, high) - low) / (high - low)
    return center_pad_or_crop(x, input_size, value=0.0, maps=maps)


class MerlinExtractor(ForeignExtractor):
    """Merlin image encoder: global embedding and resampled patch tokens (see module doc)."""

    kind = "merlin"

    def __init__(
        self,
        model: MerlinImageEncoder,
        *,
        embedding: str,
        input_size: Sequence[int],
        patch_size: int,
        **base: Any,
    ) -> None:
        if embedding not in ("image", "contrastive"):
            raise VoxelFMError(
                f"merlin: embedding must be 'image' or 'contrastive', got {embedding!r}"
            )
        dim = model.feature_dim if embedding == "image" else model.contrastive_head.out_channels
        super().__init__(embed_dim=dim, patch_size=patch_size, model_name=MODEL, **base)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.embedding = embedding
        self.input_size = tuple(int(n) for n in input_size)

    def forward(self, hu: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        hu = hu.to(self.device, torch.float32)
        batch, _, *shape = hu.shape
        inputs, maps = [], []
        for row in range(batch):
            # Drop our high-end padding first so the centre crop/pad matches Merlin's own.
            box = valid_box(None if valid is None else valid[row], shape)
            sample_maps = [AxisMap(source=axis, shift=-box[axis].start) for axis in range(3)]
            inputs.append(preprocess(hu[row][(slice(None), *box)], self.input_size, sample_maps))
            maps.append(sample_maps)
        with self.autocast():
            features = self.model.feature_map(torch.stack(inputs)).float()  # (B, C, r, a, s)
        if self.embedding == "contrastive":
            head = self.model.contrastive_head
            features = F.conv3d(features, head.weight.float(), head.bias.float())
        cls = features.mean(dim=(2, 3, 4))
        if self.embedding == "contrastive":
            cls = F.normalize(cls, dim=-1)
        p = int(self.patch_size)
        grid = [n // p for n in shape]
        patch = torch.stack(
            [
                sample_feature_grid(features[row], maps[row], self.input_size, grid, p)
                for row in range(batch)
            ]
        )
        return cls, patch

    def _extra_description(self) -> dict[str, Any]:
        return {**super()._extra_description(), "embedding": self.embedding}


def build_merlin(
    config: Mapping[str, Any], device: torch.device, precision: str
) -> MerlinExtractor:
    """Config options: path | random_weights, name, device, spacing_mm, embedding ("image" |
    "contrastive"), patch_size (16), input_size ([224, 224, 160]), overrides (constructor
    arguments of MerlinImageEncoder: layers, width, num_phenotypes, projection_dim), seed."""
    options = foreign_options(
        config, MODEL, optional=("embedding", "patch_size", "input_size", "overrides", "seed")
    )
    model, sha = build_encoder_model(
        options,
        "merlin",
        partial(MerlinImageEncoder, **dict(options.get("overrides") or {})),
        load=partial(
            load_encoder_weights,
            model=MODEL,
            download_hint=DOWNLOAD_HINT,
            prefixes=PREFIXES,
            ignore_prefixes=IGNORE_PREFIXES,
        ),
    )
    input_size = tuple(int(n) for n in options.get("input_size", INPUT_SIZE))
    if len(input_size) != 3 or input_size[0] % 32 or input_size[1] % 32 or input_size[2] % 16:
        raise VoxelFMError(
            f"merlin: input_size must be three sizes, multiples of (32, 32, 16), got {input_size}"
        )
    return MerlinExtractor(
        model,
        embedding=options.get("embedding", "image"),
        input_size=input_size,
        patch_size=int(options.get("patch_size", 16)),
        name=options.get("name", "merlin"),
        config=config,
        device=extractor_device(options, device),
        precision=precision,
        spacing_mm=spacing_option(options, SPACING_MM),
        weights_sha256=sha,
        preprocessing={
            "orientation": "RAS (canonical axes as they are)",
            "spacing_mm": list(SPACING_MM),
            "hu_window": list(HU_WINDOW),
            "scale": "[0, 1]",
            "center_pad_or_crop": list(input_size),
            "pad_value": 0.0,
            "source": "StanfordMIMI/Merlin merlin/data/monai_transforms.py",
        },
    )
