"""The DALI graphs, one ``@pipeline_def`` per split. Imports DALI: load it through
``data_pipeline.feeds`` (which turns a missing DALI into a DataError), not directly.

Both graphs take encoded files from ``fn.external_source``; the training graph also
takes the crop position and flip of every sample, drawn in Python by
:mod:`data_pipeline.sampler`, so the pixels do not depend on which rank decodes
them. They return uint8 CHW crops: the PCA noise and the normalisation are applied
in torch after the pair's all-gather (4x fewer bytes to gather than floats).

On a GPU the decoder is DALI's ``mixed`` one (nvJPEG) and the other operators run
on the GPU; on a CPU the same operators run on the CPU.
"""

from __future__ import annotations

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

__all__ = ["TEN_VIEWS", "train_pipeline", "val_pipeline"]

_CORNERS_AND_CENTRE = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
TEN_VIEWS = tuple((x, y, mirror) for mirror in (0, 1) for x, y in _CORNERS_AND_CENTRE)  # the paper's test views
_VIEWS = {1: TEN_VIEWS[:1], 10: TEN_VIEWS}


def _devices(gpu: bool) -> tuple[str, str]:
    """(decoder device, device of the operators after it)."""
    return ("mixed", "gpu") if gpu else ("cpu", "cpu")


def _shorter_side(encoded):
    """Each file's shorter side in pixels, read from its header (a CPU node)."""
    shape = fn.peek_image_shape(encoded)  # HWC
    return dmath.min(shape[0], shape[1])


def _linear_unless_same_size(shorter, target: int):
    """Per sample: nearest neighbour where the shorter side already is ``target`` (the
    scale is exactly 1, so it is an exact copy), linear otherwise. DALI's linear filter
    costs more than the decode even at scale 1 (docs/BENCHMARKS.md); data down-sampled the paper's way (``data_pipeline.downsample``) is all that case."""
    return fn.cast(shorter != target, dtype=types.INTERP_TYPE)  # 0: INTERP_NN, 1: INTERP_LINEAR


@pipeline_def
def train_pipeline(source, *, gpu: bool, image_size: int, resize: int, roi_decode: bool):
    """Resize the shorter side to ``resize``, crop ``image_size`` at (crop_x, crop_y), flip: uint8 CHW.

    ``source`` yields batches ``(encoded files, crop_x, crop_y, flip)``; crop positions
    are fractions of the free space (0 = left/top edge, 1 = right/bottom edge).
    """
    decoder, device = _devices(gpu)
    encoded, crop_x, crop_y, flip = fn.external_source(source=source, num_outputs=4, batch=True)
    shorter = _shorter_side(encoded)
    if roi_decode:
        # The same window, taken before resizing: decode only that square of the file
        # (its side is short * image_size / resize in original pixels), then scale it.
        side = dmath.max(shorter * (image_size / resize), 1.0)
        images = fn.decoders.image_crop(
            encoded, device=decoder, output_type=types.RGB,
            crop_w=side, crop_h=side, crop_pos_x=crop_x, crop_pos_y=crop_y,
        )
        images = fn.resize(images, device=device, size=[image_size, image_size],
                           interp_type=_linear_unless_same_size(side, image_size))
    else:
        images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        images = fn.resize(images, device=device, resize_shorter=resize,
                           interp_type=_linear_unless_same_size(shorter, resize))
    # Crops image_size from what is left (a no-op after the ROI decode), mirrors, goes CHW.
    return fn.crop_mirror_normalize(
        images, device=device, crop=(image_size, image_size), crop_pos_x=crop_x, crop_pos_y=crop_y,
        mirror=flip, dtype=types.UINT8, output_layout="CHW",
    )


@pipeline_def
def val_pipeline(source, *, gpu: bool, image_size: int, resize: int, views: int):
    """Resize the shorter side to ``resize``; the centre crop, or the paper's ten views stacked: uint8."""
    decoder, device = _devices(gpu)
    encoded = fn.external_source(source=source, batch=True)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    images = fn.resize(images, device=device, resize_shorter=resize,
                       interp_type=_linear_unless_same_size(_shorter_side(encoded), resize))
    crops = [
        fn.crop_mirror_normalize(
            images, device=device, crop=(image_size, image_size), crop_pos_x=x, crop_pos_y=y,
            mirror=mirror, dtype=types.UINT8, output_layout="CHW",
        )
        for x, y, mirror in _VIEWS[views]
    ]
    return fn.stack(*crops, device=device) if len(crops) > 1 else crops[0]
