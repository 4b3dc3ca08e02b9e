"""Nucleus segmentation networks: smp U-Net / U-Net++ with learned ConvTranspose upsampling.

segmentation-models-pytorch (smp) builds the encoders and decoders; its decoder blocks upsample
with ``F.interpolate(..., mode="nearest")``. Following the paper, every decoder block here
upsamples instead with a learned ``ConvTranspose2d(c, c, kernel_size=2, stride=2)``. smp has no
option for it, so :func:`create_segmentation_model` builds the smp model and then swaps each
decoder block for a :class:`UnetUpBlock` / :class:`UnetPlusPlusUpBlock` that reuses the block's
convolutions and attention modules (state-dict keys stay smp's, plus ``<block>.upsample.*``).
A ``Dropout2d`` sits right before the segmentation head's convolution.

Input: float32 (B, 3, H, W) from :func:`preprocess` (ImageNet mean/std normalization), with H and W
divisible by ``2**encoder_depth`` (32 by default). Output: float32 logits (B, 1, H, W); apply
``sigmoid`` for nucleus probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

if TYPE_CHECKING:
    import segmentation_models_pytorch as smp
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
    from segmentation_models_pytorch.decoders.unetplusplus.decoder import DecoderBlock as UnetPlusPlusDecoderBlock

logger = logging.getLogger(__name__)

SEGMENTATION_ARCHS: tuple[str, ...] = ("unet", "unetplusplus")
"""Valid ``name`` values of :func:`create_segmentation_model`."""

DEFAULT_DECODER_CHANNELS: tuple[int, ...] = (256, 128, 64, 32, 16)
"""smp's decoder widths for depth 5; shallower encoders take the last ``encoder_depth`` of them."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _smp_decoder_blocks() -> tuple[type[UnetDecoderBlock], type[UnetPlusPlusDecoderBlock]]:
    """smp's U-Net and U-Net++ decoder block classes.

    smp (and timm, which it imports) is imported only when a segmentation model is built: importing it costs 2-3 s,
    and the classifier jobs, which import this module for :func:`preprocess`, never need it.
    """
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
    from segmentation_models_pytorch.decoders.unetplusplus.decoder import DecoderBlock

    return UnetDecoderBlock, DecoderBlock


def preprocess(images: npt.NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
    """Turn RGB pixels into network input; training and inference must both use this.

    images: uint8 (B, H, W, 3) or (H, W, 3) RGB, numpy or torch (any device).
    Returns float32 (B, 3, H, W) on the input's device: ``(images / 255 - IMAGENET_MEAN) / IMAGENET_STD``.
    ImageNet statistics keep the input zero-centred and stay correct should pretrained encoder
    weights ever be used.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 RGB pixels, got dtype {x.dtype}; convert with .astype(np.uint8)")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"preprocess expects (B, H, W, 3) or (H, W, 3) RGB pixels, got shape {tuple(x.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return ((x - mean) / std).contiguous()


def _transposed_upsample(channels: int) -> nn.ConvTranspose2d:
    """Learned 2x upsampling, initialised to reproduce nearest-neighbour upsampling exactly.

    weight[c, c] = 1, else 0; bias 0: the network starts out as smp's stock model (the paper does not
    say how it initialises the deconvolutions) and training learns the kernel from there.
    """
    up = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
    with torch.no_grad():
        up.weight.zero_()
        up.weight[torch.arange(channels), torch.arange(channels)] = 1.0
        up.bias.zero_()
    return up


class _TransposedUpBlock(nn.Module):
    """The conv/attention modules of an smp decoder block behind a ConvTranspose upsampling (U-Net and U-Net++ alike).

    Keeps smp's module names, so the state dict reads like the stock block's plus ``upsample``.
    """

    def __init__(self, block: UnetDecoderBlock | UnetPlusPlusDecoderBlock, in_channels: int) -> None:
        super().__init__()
        self.upsample = _transposed_upsample(in_channels)
        self.conv1 = block.conv1
        self.attention1 = block.attention1
        self.conv2 = block.conv2
        self.attention2 = block.attention2

    def _decode(self, upsampled: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """smp's block after its upsampling: concatenate ``skip`` (then attention), two convs, attention."""
        if skip is not None:
            upsampled = torch.cat([upsampled, skip], dim=1)
            upsampled = self.attention1(upsampled)
        return self.attention2(self.conv2(self.conv1(upsampled)))


class UnetUpBlock(_TransposedUpBlock):
    """smp ``UnetDecoderBlock`` with ConvTranspose upsampling; takes over the block's conv/attention modules.

    forward: x float32 (B, C_in, h, w) -> (B, C_out, 2h, 2w), concatenating ``skip_connection``
    (B, C_skip, 2h, 2w) when given. Signature matches smp's ``UnetDecoder`` call.
    """

    def forward(
        self,
        feature_map: torch.Tensor,
        target_height: int,
        target_width: int,
        skip_connection: torch.Tensor | None = None,
    ) -> torch.Tensor:
        feature_map = self.upsample(feature_map)
        # smp's U-Net resizes to any target; a stride-2 deconvolution only doubles, so the input
        # must be divisible by 2**depth (enforced by check_input_shape, see create_segmentation_model).
        if feature_map.shape[-2:] != (target_height, target_width):
            raise RuntimeError(
                f"decoder upsampled to {tuple(feature_map.shape[-2:])}, expected ({target_height}, {target_width}); "
                "pad the input so that height and width are divisible by 2**encoder_depth"
            )
        return self._decode(feature_map, skip_connection)


class UnetPlusPlusUpBlock(_TransposedUpBlock):
    """smp U-Net++ ``DecoderBlock`` (one nested node x_d_l) with ConvTranspose upsampling.

    forward: x float32 (B, C_in, h, w) -> (B, C_out, 2h, 2w), concatenating ``skip`` (B, C_skip, 2h, 2w)
    when given.
    """

    def __init__(self, block: UnetPlusPlusDecoderBlock, in_channels: int) -> None:
        if block.is_empty:
            # Only happens with a 0 in decoder_channels, which create_segmentation_model rejects.
            raise ValueError("decoder_channels must be positive; a U-Net++ block with 0 output channels is unsupported")
        super().__init__(block, in_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        return self._decode(self.upsample(x), skip)


def _block_input_channels(model: smp.base.SegmentationModel, encoder_depth: int) -> dict[str, int]:
    """Channels entering each decoder block, keyed by the block's module name.

    Read off one tiny forward pass (hooks on the blocks) rather than re-deriving smp's channel
    arithmetic, which differs between U-Net, U-Net++ and encoders with a centre block.
    """
    seen: dict[str, int] = {}
    handles = []
    blocks = _smp_decoder_blocks()
    for name, module in model.decoder.named_modules():
        if isinstance(module, blocks):

            def record(_module: nn.Module, args: tuple, _name: str = name) -> None:
                seen[_name] = int(args[0].shape[1])

            handles.append(module.register_forward_pre_hook(record))
    was_training = model.training
    side = 2 ** (encoder_depth + 1)
    try:
        model.eval()  # eval: the probe must not touch BatchNorm running statistics
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


def _replace_upsampling(model: smp.base.SegmentationModel, encoder_depth: int) -> int:
    """Swap every smp decoder block for its ConvTranspose version in place; returns how many were swapped."""
    in_channels = _block_input_channels(model, encoder_depth)
    unet_block, unetplusplus_block = _smp_decoder_blocks()
    swapped = 0
    for name, block in list(model.decoder.named_modules()):
        if isinstance(block, unet_block):
            new: nn.Module = UnetUpBlock(block, in_channels[name])
        elif isinstance(block, unetplusplus_block):
            new = UnetPlusPlusUpBlock(block, in_channels[name])
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.decoder.get_submodule(parent_name) if parent_name else model.decoder
        # ModuleList children are named "0", "1", ...; setattr on a ModuleList accepts those.
        setattr(parent, child, new)
        swapped += 1
    return swapped


def _prune_unused_encoder_modules(model: smp.base.SegmentationModel, encoder_depth: int) -> list[str]:
    """Replace the encoder modules that a forward pass never calls by ``nn.Identity``; returns their names.

    Some smp encoders keep the layers past ``encoder_depth`` and skip them in ``forward`` (smp 0.6's mobilenet_v2
    keeps all 19 feature stages: at depth 3, three quarters of its weights, and resnets keep layer4). They would only
    bloat every checkpoint. Found by one probe forward pass, so it holds for any encoder; the modules that run keep
    their weights and names.
    """
    called: set[str] = set()
    handles = [
        module.register_forward_pre_hook(lambda *_args, _name=name: called.add(_name))
        for name, module in model.encoder.named_modules()
        if name
    ]
    side = 2 ** (encoder_depth + 1)
    try:
        model.eval()  # the probe must not touch BatchNorm running statistics
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side))
    finally:
        for handle in handles:
            handle.remove()
        model.train()
    # A container the encoder iterates over (a Sequential of stages) is not called itself, but its stages are.
    used = {".".join(name.split(".")[:i]) for name in called for i in range(1, name.count(".") + 2)}
    pruned: list[str] = []
    for name, module in list(model.encoder.named_modules()):
        inside_pruned = any(name.startswith(f"{p}.") for p in pruned)
        if not name or name in used or inside_pruned or not any(True for _ in module.parameters()):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.encoder.get_submodule(parent_name) if parent_name else model.encoder, child, nn.Identity())
        pruned.append(name)
    return [f"encoder.{name}" for name in pruned]


def create_segmentation_model(
    name: str,
    encoder: str = "resnet34",
    dropout: float = 0.3,
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] | None = None,
) -> nn.Module:
    """Build a randomly initialised binary nucleus segmentation network.

    name: one of ``SEGMENTATION_ARCHS`` ("unet", "unetplusplus").
    encoder: an smp encoder name (e.g. "resnet34", "resnet18", "mobilenet_v2", "efficientnet-b0");
        weights are never downloaded (``encoder_weights=None``).
    dropout: ``Dropout2d`` probability right before the segmentation head's convolution, in [0, 1).
    encoder_depth: encoder stages, 3..5; input H and W must be divisible by ``2**encoder_depth``.
    decoder_channels: one width per decoder stage (length ``encoder_depth``); default
        ``DEFAULT_DECODER_CHANNELS[-encoder_depth:]``.
    Returns a module mapping float32 (B, 3, H, W) (see :func:`preprocess`) to logits (B, 1, H, W).
    """
    if name not in SEGMENTATION_ARCHS:
        raise ValueError(f"unknown segmentation architecture {name!r}; expected one of {list(SEGMENTATION_ARCHS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must lie in [0, 1)")
    if encoder_depth not in (3, 4, 5):
        raise ValueError(f"encoder_depth={encoder_depth!r} must be 3, 4 or 5")
    channels = tuple(DEFAULT_DECODER_CHANNELS[-encoder_depth:] if decoder_channels is None else decoder_channels)
    if len(channels) != encoder_depth or any(int(c) != c or c <= 0 for c in channels):
        raise ValueError(
            f"decoder_channels={channels!r} must hold {encoder_depth} positive integers (one per encoder stage)"
        )
    import segmentation_models_pytorch as smp  # lazily: see _smp_decoder_blocks

    available = smp.encoders.get_encoder_names()
    if encoder not in available:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of smp's encoders, e.g. resnet18, resnet34")

    model = {"unet": smp.Unet, "unetplusplus": smp.UnetPlusPlus}[name](
        encoder_name=encoder,
        encoder_weights=None,
        encoder_depth=encoder_depth,
        decoder_channels=channels,
        in_channels=3,
        classes=1,
        activation=None,
    )
    swapped = _replace_upsampling(model, encoder_depth)
    model.pruned_modules = _prune_unused_encoder_modules(model, encoder_depth)
    # smp's U-Net accepts any size because it interpolates to the skip's size; the deconvolution
    # only doubles, so make smp's own shape check (a clear RuntimeError) apply to both archs.
    model.requires_divisible_input_shape = True
    head = model.segmentation_head
    model.segmentation_head = nn.Sequential(nn.Dropout2d(p=dropout), *head)
    logger.debug("built %s/%s: %d ConvTranspose decoder stages, dropout %.2f", name, encoder, swapped, dropout)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
