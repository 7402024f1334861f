"""The DALI feeds in one process: shapes, values, flips, crops, PCA noise, order, resume, views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import DataError, list_images
from data_pipeline.eigen import IMAGENET_EIGVAL, IMAGENET_EIGVEC
from data_pipeline.feeds import IMAGENET_MEAN, IMAGENET_STD, load_dali
from data_pipeline.sampler import PCA_ALPHA_STD, draw_augmentation, pca_shift
from tests.data_fixtures import make_photo_folder, numbered, packed, run_graph, solid_jpeg, train_feed, val_feed

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = make_photo_folder(str(tmp_path_factory.mktemp("photos")), {"a": 13, "b": 12, "c": 11})
    return list_images(root)


@pytest.fixture(scope="module")
def packed_photos(photos, tmp_path_factory):
    """The same photos, packed (3 shards)."""
    return packed(photos.root, str(tmp_path_factory.mktemp("packed") / "photos"), shards=3)


@pytest.fixture(params=["folder", "packed"])
def image_set(request):
    """The photos as a folder, then packed: tests of the feed hold for both."""
    return request.getfixturevalue({"folder": "photos", "packed": "packed_photos"}[request.param])


def batches(feed, epoch=0, start_step=0):
    return [(x.clone(), y.clone()) for x, y in feed.epoch(epoch, start_step)]


def test_train_batches_shape_dtype_and_value_range(photos):
    feed = train_feed(photos, micro_batch_size=8)
    assert feed.steps_per_epoch == 36 // 8  # the last partial batch is dropped
    out = batches(feed)
    assert len(out) == 4
    for x, y in out:
        assert x.shape == (8, 3, 56, 56) and x.dtype == torch.float32 and y.dtype == torch.int64
        pixels = x * STD + MEAN  # back on the 0..255 scale: inside it, up to the PCA shift
        assert pixels.min() > -40 and pixels.max() < 295
    (x16, _), *_ = batches(train_feed(photos, dtype=torch.float16))
    assert x16.dtype == torch.float16
    assert torch.allclose(x16.float(), out[0][0], atol=0.01)


def test_centre_crop_without_augmentation_is_normalised_uint8(photos):
    (x, _), *_ = batches(train_feed(photos, augment=False))
    pixels = x * STD + MEAN
    assert torch.allclose(pixels, pixels.round(), atol=2e-3)  # exactly (u8 - mean) / std, no noise
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    assert torch.equal(x, batches(train_feed(photos, augment=False))[0][0])


@pytest.mark.parametrize("roi_decode", [True, False])
def test_flip_mirrors_the_same_crop(photos, roi_decode):
    files = photos.files[:4]
    x = [0.0, 0.3, 0.8, 1.0]
    plain = run_graph(files, x, [0.2] * 4, [0] * 4, roi_decode=roi_decode)
    flipped = run_graph(files, x, [0.2] * 4, [1] * 4, roi_decode=roi_decode)
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)


@pytest.mark.parametrize("roi_decode", [True, False])
def test_crops_stay_inside_the_image(tmp_path, roi_decode):
    colour = torch.tensor([200, 120, 40]).view(3, 1, 1)
    sizes = [(96, 72), (72, 96), (37, 300), (300, 37), (1, 1), (64, 64)]
    files = [solid_jpeg(str(tmp_path / f"{w}x{h}.jpg"), (w, h)) for w, h in sizes]
    for cx, cy in [(0, 0), (1, 1), (0, 1), (1, 0), (0.5, 0.5)]:
        out = run_graph(files, [cx] * len(files), [cy] * len(files), [0] * len(files), roi_decode=roi_decode)
        assert out.shape == (len(files), 3, 56, 56)
        assert (out.int() - colour).abs().max() <= 6, f"padding or foreign pixels at crop position {(cx, cy)}"


def test_files_already_at_the_resize_size_are_cropped_not_resampled(tmp_path):
    """Data down-sampled the paper's way (shorter side = data.resize): the crop is the
    file's pixels, copied. Lossless noise, so any resampling would show."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in [(64, 64), (80, 64), (64, 72)]]
    files = []
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    cx, cy = [1, 1, 0], [0, 1, 1]  # corners: offsets exactly 0 or (side - 56)
    for roi_decode in (True, False):
        out = run_graph(files, cx, cy, [0] * 3, roi_decode=roi_decode)  # image_size 56, resize 64
        for crop, p, x, y in zip(out, pixels, cx, cy):
            x0, y0 = x * (p.shape[1] - 56), y * (p.shape[0] - 56)
            assert np.array_equal(crop.permute(1, 2, 0).numpy(), p[y0:y0 + 56, x0:x0 + 56]), roi_decode


def test_nearest_neighbour_only_at_a_scale_of_exactly_one():
    from nvidia.dali import fn, pipeline_def, types

    pipelines = load_dali()

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def interpolation():
        shorter = fn.external_source(source=lambda: [np.array(v, np.float32) for v in (64, 63.5, 65, 1)], batch=True)
        return fn.cast(pipelines._linear_unless_same_size(shorter, 64), dtype=types.INT32)

    pipe = interpolation()
    (out,) = pipe.run()
    assert np.array(out.as_tensor()).ravel().tolist() == [int(types.INTERP_NN)] + [int(types.INTERP_LINEAR)] * 3


def test_pca_shift_has_the_intended_covariance():
    alpha = draw_augmentation(200_000, seed=0, epoch=0, augment=True).alpha
    shift = pca_shift(alpha.astype(np.float64), IMAGENET_EIGVAL, IMAGENET_EIGVEC)
    expected = IMAGENET_EIGVEC @ np.diag((PCA_ALPHA_STD * IMAGENET_EIGVAL) ** 2) @ IMAGENET_EIGVEC.T
    assert np.allclose(np.cov(shift, rowvar=False), expected, rtol=0.03, atol=1e-7)
    assert np.allclose(shift.mean(0), 0, atol=3 * PCA_ALPHA_STD * IMAGENET_EIGVAL.max() / np.sqrt(len(shift)))


def test_pca_shift_is_added_to_every_pixel(photos):
    no_noise = (np.zeros(3), IMAGENET_EIGVEC)
    (x, _), *_ = batches(train_feed(photos))
    (x0, _), *_ = batches(train_feed(photos, eigen=no_noise))  # same crops and flips, no colour noise
    diff = (x - x0) * STD  # 0..255 scale
    per_image = diff.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(diff, per_image.expand_as(diff), atol=1e-3)
    alpha = draw_augmentation(len(photos), 0, 0, True).alpha  # indexed by epoch position: batch 0 holds 0..7
    expected = 255 * pca_shift(alpha[:8], IMAGENET_EIGVAL, IMAGENET_EIGVEC)
    assert np.allclose(per_image.view(8, 3).numpy(), expected, atol=1e-3)


def test_epochs_reshuffle_reproducibly_and_resume_exactly(image_set):
    feed = train_feed(image_set)
    first, again, other = batches(feed, 0), batches(feed, 0), batches(feed, 1)
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))
    resumed = batches(train_feed(image_set), 0, start_step=2)
    assert len(resumed) == 2
    for (x, y), (x2, y2) in zip(first[2:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_a_packed_set_gives_the_folders_batches_bit_for_bit(photos, packed_photos):
    """Without --resize the packed bytes are the files' bytes: every pixel of every batch,
    augmented, in training and in the ten validation views, is the folder's."""
    assert packed_photos.classes == photos.classes and np.array_equal(packed_photos.labels, photos.labels)
    for epoch in (0, 1):
        for (x, y), (xp, yp) in zip(batches(train_feed(photos), epoch), batches(train_feed(packed_photos), epoch),
                                    strict=True):
            assert torch.equal(x, xp) and torch.equal(y, yp)
    for (x, y), (xp, yp) in zip(val_feed(photos, batch_size=5, views=10).batches(),
                                val_feed(packed_photos, batch_size=5, views=10).batches(), strict=True):
        assert torch.equal(x, xp) and torch.equal(y, yp)


def test_a_batch_does_not_depend_on_the_layout(image_set):
    ids = numbered(image_set)
    whole = batches(train_feed(ids, micro_batch_size=8))
    halves = [batches(train_feed(ids, micro_batch_size=4, replica=r, num_replicas=2)) for r in range(2)]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(x, torch.cat([halves[0][step][0], halves[1][step][0]]))
        assert torch.equal(y, torch.cat([halves[0][step][1], halves[1][step][1]]))


def test_starting_an_epoch_ends_the_previous_one(photos):
    feed = train_feed(photos)
    old = feed.epoch(0)
    next(old)
    new = feed.epoch(1)
    assert next(new)[0].shape == (8, 3, 56, 56)
    with pytest.raises(StopIteration):
        next(old)
    feed.close()


def test_synthetic_batches_are_a_replicas_own_and_the_same_every_step():
    from data_pipeline import SyntheticFeed

    def feed(replica: int) -> SyntheticFeed:
        return SyntheticFeed(micro_batch_size=4, num_classes=10, seed=0, replica=replica, num_replicas=2,
                             device=torch.device("cpu"), dtype=torch.float32, image_size=56)

    (x, y), *rest = list(feed(0).epoch(0, start_step=feed(0).steps_per_epoch - 3))
    assert x.shape == (4, 3, 56, 56) and len(rest) == 2 and feed(0).steps_per_epoch == 1_281_167 // 8
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for x2, y2 in rest)
    (x_again, _), = list(feed(0).epoch(5, start_step=feed(0).steps_per_epoch - 1))  # each rank of the pair
    (x_other, _), = list(feed(1).epoch(0, start_step=feed(1).steps_per_epoch - 1))
    assert torch.equal(x, x_again) and not torch.equal(x, x_other)


def test_feed_errors_are_one_line():
    with pytest.raises(DataError, match="must be even"):
        train_feed(numbered(["x.jpg"] * 8), micro_batch_size=3, pair_size=2)
    with pytest.raises(DataError, match="fewer than one global batch"):
        train_feed(numbered(["x.jpg"] * 8), micro_batch_size=4, num_replicas=4)


@pytest.mark.parametrize("batch_size", [1, 5, 36])
def test_validation_counts_every_image_once(image_set, batch_size):
    ids = numbered(image_set)
    feed = val_feed(ids, batch_size=batch_size)
    labels = torch.cat([y for _, y in feed.batches()])
    assert feed.num_images == 36 and sorted(labels.tolist()) == list(range(36))


def test_ten_views_are_corners_centre_and_their_mirrors(photos):
    (one, y1), *_ = val_feed(photos, batch_size=3).batches()
    (ten, y10), *_ = val_feed(photos, batch_size=3, views=10).batches()
    assert ten.shape == (30, 3, 56, 56) and torch.equal(y1, y10)
    ten = ten.view(3, 10, 3, 56, 56)
    assert torch.equal(ten[:, 0], one)  # view 0 is the centre crop
    assert torch.equal(ten[:, 5:], ten[:, :5].flip(-1))  # views 5-9 mirror views 0-4
    assert len({v.sum().item() for v in ten[0, :5]}) == 5  # five different windows
