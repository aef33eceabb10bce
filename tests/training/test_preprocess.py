"""preprocess_image / resize_mask: pure functions, no Ray."""

import dataclasses

import numpy as np
import pytest

from study.config import PreprocessConfig
from study.errors import DataError
from training.preprocess import preprocess_image, resize_mask

CFG = PreprocessConfig(image_size=32)


def _chest(dtype=np.uint8, size=128, seed=0) -> np.ndarray:
    """A smooth gradient with noise and a dark low-contrast half, so CLAHE has work to do."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    ramp = np.linspace(0.1, 0.6, size)[None, :] * np.ones((size, 1))
    ramp[:, : size // 2] *= 0.3
    noisy = ramp + rng.normal(0, 0.02, (size, size))
    return (np.clip(noisy, 0, 1) * top).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_output_is_zscored_float16_at_network_size(dtype):
    out = preprocess_image(_chest(dtype), CFG)
    assert out.dtype == np.float16 and out.shape == (32, 32)
    values = out.astype(np.float64)
    assert abs(values.mean()) < 1e-2 and abs(values.std() - 1) < 1e-2


def test_non_square_input_is_resized_to_a_square():
    assert preprocess_image(_chest()[:, :100], CFG).shape == (32, 32)


def test_constant_image_gives_zeros_not_nan():
    out = preprocess_image(np.full((64, 64), 77, np.uint8), CFG)
    assert np.isfinite(out.astype(np.float32)).all() and not out.any()


def test_clahe_changes_the_image_and_can_be_switched_off():
    image = _chest()
    with_clahe = preprocess_image(image, CFG)
    without = preprocess_image(image, dataclasses.replace(CFG, clahe=False))
    assert np.abs(with_clahe.astype(np.float32) - without.astype(np.float32)).max() > 0.1


def test_sixteen_bit_input_matches_its_eight_bit_version_without_clahe():
    image8 = _chest(np.uint8)
    image16 = image8.astype(np.uint16) * 257  # the same picture on the 16-bit scale
    cfg = dataclasses.replace(CFG, clahe=False)
    np.testing.assert_allclose(preprocess_image(image16, cfg).astype(np.float32),
                               preprocess_image(image8, cfg).astype(np.float32), atol=2e-2)


def test_without_zscore_intensity_is_scaled_to_unit_range():
    cfg = dataclasses.replace(CFG, zscore=False)
    for dtype in (np.uint8, np.uint16):
        out = preprocess_image(np.full((64, 64), np.iinfo(dtype).max, dtype), cfg)
        assert np.isfinite(out.astype(np.float32)).all() and out.max() == 1.0


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 3), np.uint8)])
def test_rejects_other_dtypes_and_colour(bad):
    with pytest.raises(DataError, match="uint8 or uint16"):
        preprocess_image(bad, CFG)


def test_resize_mask_keeps_zero_one_and_area():
    mask = np.zeros((1024, 1024), bool)
    mask[100:400, 300:700] = True
    small = resize_mask(mask, 224)
    assert small.dtype == np.uint8 and small.shape == (224, 224)
    assert set(np.unique(small)) == {0, 1}
    assert small.mean() == pytest.approx(mask.mean(), rel=0.02)


def test_resize_mask_of_an_empty_mask_is_empty():
    assert not resize_mask(np.zeros((50, 60), bool), 16).any()


def test_resize_mask_is_pils_nearest_and_not_scikit_images_order_0():
    """The comment in resize_mask says which reference the stored masks follow: PIL's NEAREST
    (pixel centres) at every size, and not scikit-image's resize(order=0)."""
    import numpy as np
    from PIL import Image
    from skimage.transform import resize

    from training.preprocess import resize_mask

    rng = np.random.default_rng(0)
    mask = (rng.random((256, 256)) > 0.5).astype(np.uint8)
    for size in (96, 224, 500):
        pil = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
        np.testing.assert_array_equal(resize_mask(mask, size), pil)
    scikit = resize(mask, (96, 96), order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8)
    assert (resize_mask(mask, 96) != scikit).any()
