"""Attention blocks applied to the last feature map ``[B, C, H, W]``.

They keep the spatial size; all but "dual" keep the channels too, and a block that changes them
says so in ``out_channels`` (what the pooling after it is built for).

"dual" follows "Dual Attention Network for Scene Segmentation" (Fu et al., arXiv:1809.02983):
a position (spatial self-attention) and a channel attention module, each between two 3x3
conv + BN + ReLU layers, summed. "se" and "cbam" are
timm's Squeeze-and-Excitation (Hu et al., arXiv:1709.01507) and CBAM (Woo et al.,
arXiv:1807.06521) modules. "deform" is a residual 3x3 deformable convolution ("Deformable
Convolutional Networks", Dai et al., arXiv:1703.06211) through ``torchvision.ops.deform_conv2d``.

``build_attention(name, channels)`` builds one; ``ATTENTIONS.names()`` lists them ("none" is
the identity).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import deform_conv2d

from finegrain.registry import Registry

ATTENTIONS: Registry = Registry("attention")


@ATTENTIONS.register("none")
def _none(channels: int) -> nn.Module:
    return nn.Identity()


@ATTENTIONS.register("se")
def _se(channels: int) -> nn.Module:
    from timm.layers import SEModule

    return SEModule(channels, rd_ratio=1 / 16, rd_divisor=1)


@ATTENTIONS.register("cbam")
def _cbam(channels: int) -> nn.Module:
    from timm.layers.cbam import CbamModule

    return CbamModule(channels, rd_ratio=1 / 16, rd_divisor=1)


class PositionAttention(nn.Module):
    """DANet PAM: ``x + gamma * V softmax(Q^T K)^T`` over the H*W positions (gamma starts at 0)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        qk = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, qk, 1)
        self.key = nn.Conv2d(channels, qk, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # [B, N, C']
        k = self.key(x).flatten(2)  # [B, C', N]
        attn = torch.softmax(torch.bmm(q, k), dim=-1)  # [B, N, N]: row i attends over positions j
        v = self.value(x).flatten(2)  # [B, C, N]
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)
        return x + self.gamma * out


class ChannelAttention(nn.Module):
    """DANet CAM: ``x + beta * softmax(max(E) - E) X`` with ``E = X X^T`` over channels."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.flatten(2)  # [B, C, N]
        energy = torch.bmm(flat, flat.transpose(1, 2))
        # the paper's max - E trick: a softmax that favours dissimilar channels, numerically tame
        attn = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
        return x + self.beta * torch.bmm(attn, flat).view(b, c, h, w)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@ATTENTIONS.register("dual")
class DualAttention(nn.Module):
    """DANet's attention head: ``conv(PAM(conv_a(x))) + conv(CAM(conv_c(x)))``.

    As in the paper (Sec. 3.1 and Fig. 2) and the authors' ``DANetHead`` (junfu1115/DANet): each
    branch reduces the input with a 3x3 conv + BN + ReLU to ``inter_channels`` (the authors'
    ``in_channels // 4``), applies its attention module, and transforms the result with another
    3x3 conv + BN + ReLU; the two branches are summed. The output has ``out_channels =
    inter_channels`` channels.

    Args:
        channels: input channels.
        inter_channels: channels of both branches and of the output (default ``channels // 4``).
    """

    def __init__(self, channels: int, inter_channels: int | None = None):
        super().__init__()
        inter = inter_channels or max(1, channels // 4)
        self.out_channels = inter
        self.position_in, self.channel_in = _conv_bn_relu(channels, inter), _conv_bn_relu(channels, inter)
        self.position = PositionAttention(inter)
        self.channel = ChannelAttention()
        self.position_out, self.channel_out = _conv_bn_relu(inter, inter), _conv_bn_relu(inter, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.position_out(self.position(self.position_in(x)))
        return pos + self.channel_out(self.channel(self.channel_in(x)))


@ATTENTIONS.register("deform")
class DeformConvBlock(nn.Module):
    """``x + BN(deform_conv3x3(x))`` with offsets predicted by a 3x3 conv that starts at zero.

    Args:
        channels: input and output channels.
        kernel_size: odd kernel size of the deformable convolution.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size, self.padding = kernel_size, kernel_size // 2
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(channels))
        # zero-initialised offsets: the block starts as a plain convolution
        self.offset = nn.Conv2d(channels, 2 * kernel_size * kernel_size, kernel_size, padding=self.padding)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.norm = nn.BatchNorm2d(channels)

    def deform(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The deformable convolution alone, for given offsets ``[B, 2*k*k, H, W]``."""
        return deform_conv2d(x, offset, self.weight, self.bias, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # deform_conv2d has no bf16 kernel
        return x + self.norm(self.deform(x32, self.offset(x32))).to(x.dtype)


FEATURE_MAP_ONLY = tuple(n for n in ATTENTIONS.names() if n != "none")


def build_attention(name: str, channels: int) -> nn.Module:
    """Build attention ``name`` for a ``channels``-channel feature map (see :func:`attention_channels` for its output)."""
    return ATTENTIONS.get(name)(channels)


def attention_channels(block: nn.Module, channels: int) -> int:
    """Channels of ``block``'s output for a ``channels``-channel input (its ``out_channels`` where it changes them)."""
    return getattr(block, "out_channels", channels)
