"""The analytic FLOP count of the U-Net (for MFU) against sums written out by hand, and the peak table."""

import pytest

from trainer.flops import forward_flops_per_image, peak_tflops, train_flops_per_image


def test_tiny_unet_forward_flops_by_hand():
    # base 4, depth 1, one 256x256 RGB image; MACs = output pixels x kernel taps x C_in x C_out, FLOPs = 2 x MACs.
    encoder = 256 * 256 * 9 * 3 * 4 + 256 * 256 * 9 * 4 * 4  # 3x3 3->4, 3x3 4->4 at 256^2
    bottleneck = 128 * 128 * 9 * 4 * 8 + 128 * 128 * 9 * 8 * 8  # after 2x2 pooling: 3x3 4->8, 8->8 at 128^2
    up = 128 * 128 * (2 * 2) * 8 * 4  # 2x2 stride-2 transposed conv 8->4: each of the 128^2 INPUT pixels x kernel
    decoder = 256 * 256 * 9 * 8 * 4 + 256 * 256 * 9 * 4 * 4  # concat(skip 4, up 4) = 8 -> 4, then 4 -> 4
    head = 256 * 256 * 1 * 4 * 1  # 1x1 conv 4 -> 1
    macs = encoder + bottleneck + up + decoder + head
    assert macs == 61_341_696
    assert forward_flops_per_image(4, 1) == 2 * macs
    assert train_flops_per_image(4, 1) == 3 * 2 * macs


def test_residual_projections_and_border_output_by_hand():
    # base 4, depth 1, residual: a 1x1 projection wherever a block changes the width (3->4 and 8->4 at 256^2,
    # 4->8 at 128^2); a second output adds a 1x1 4->1 head channel.
    projections = 256 * 256 * 3 * 4 + 128 * 128 * 4 * 8 + 256 * 256 * 8 * 4
    assert forward_flops_per_image(4, 1, residual=True) == 2 * (61_341_696 + projections)
    assert forward_flops_per_image(4, 1, outputs=2) == 2 * (61_341_696 + 256 * 256 * 4)


def test_default_unet_train_flops_by_hand():
    # base 32, depth 4: widths 32..512 at 256..16 pixels. Encoder level l: s^2 x 9 x (C_in x w + w x w).
    w, s = [32, 64, 128, 256, 512], [256, 128, 64, 32, 16]
    encoder = s[0] ** 2 * 9 * (3 * w[0] + w[0] ** 2) + sum(s[i] ** 2 * 9 * (w[i - 1] * w[i] + w[i] ** 2)
                                                           for i in range(1, 5))
    decoder = sum(s[i] ** 2 * 9 * (2 * w[i] * w[i] + w[i] ** 2) for i in range(4))
    ups = sum(s[i + 1] ** 2 * 4 * w[i + 1] * w[i] for i in range(4))
    head = s[0] ** 2 * w[0]
    per_image = 3 * 2 * (encoder + decoder + ups + head)
    assert round(per_image / 1e9, 1) == 72.4  # what the H200 table uses
    assert train_flops_per_image(32, 4) == per_image


def test_flops_scale_with_the_image_area():
    assert forward_flops_per_image(8, 2, size=128) * 4 == forward_flops_per_image(8, 2, size=256)


@pytest.mark.parametrize("kind, backend, expected", [
    ("NVIDIA H200", "gpu", 989.0), ("NVIDIA H100 80GB HBM3", "gpu", 989.0), ("NVIDIA A100-SXM4-80GB", "gpu", 312.0),
    ("cpu", "cpu", None), ("Some Future GPU", "gpu", None),
])
def test_peak_from_the_device_kind(kind, backend, expected):
    assert peak_tflops(kind, backend) == expected
