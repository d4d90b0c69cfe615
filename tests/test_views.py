"""Counterfactual views (docs/methods/va_opd.md, "The two teacher views")."""

import numpy as np
import pytest
from PIL import Image

from trl_vaopd.views import VIEW_NAMES, blank, blur, drop_image_parts, get_view, pixelate, rows_without_text


def _checker(size=(50, 30), mode="RGB"):
    arr = (np.indices(size[::-1]).sum(0) % 2 * 255).astype(np.uint8)
    img = Image.fromarray(np.stack([arr, 255 - arr, arr // 2], -1), "RGB")
    return img.convert(mode)


def test_pixelate_is_bilinear_down_to_ten_percent_then_nearest_up():
    img = _checker((50, 30))
    out = pixelate(img, 0.1)
    expected = img.resize((5, 3), Image.Resampling.BILINEAR).resize((50, 30), Image.Resampling.NEAREST)
    assert out.size == img.size and out.mode == img.mode
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    # Only 5 x 3 distinct blocks survive: the fine checkerboard is gone
    assert len({tuple(p) for p in np.asarray(out).reshape(-1, 3)}) <= 15


def test_pixelate_floors_side_lengths_and_keeps_at_least_one_pixel():
    img = _checker((19, 5))
    out = pixelate(img, 0.1)
    expected = img.resize((1, 1), Image.Resampling.BILINEAR).resize((19, 5), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1"])
def test_views_keep_size_and_mode(mode):
    img = _checker((40, 24), mode)
    for fn in (pixelate, blur, blank):
        out = fn(img)
        assert out.size == img.size and out.mode == img.mode


def test_blank_is_the_mean_colour():
    img = _checker((10, 10))
    out = np.asarray(blank(img))
    mean = np.asarray(img).reshape(-1, 3).mean(0).round()
    assert np.all(out == mean.astype(np.uint8))


def test_named_views_and_drop():
    assert set(VIEW_NAMES) == {"pixelate", "blur", "blank", "drop"}
    img = _checker()
    view = get_view("pixelate", 0.2)
    assert view.keeps_layout
    assert np.array_equal(np.asarray(view(img)), np.asarray(pixelate(img, 0.2)))
    drop = get_view("drop")
    assert not drop.keeps_layout
    with pytest.raises(ValueError, match="removes the image"):
        drop(img)


def test_user_callable_view_and_size_change_refused():
    def flip(image):
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    view = get_view(flip)
    assert view.name == "flip" and view.keeps_layout
    assert view(_checker()).size == (50, 30)
    shrink = get_view(lambda image: image.resize((8, 8)))
    with pytest.raises(ValueError, match="changed the image size"):
        shrink(_checker())


def test_unknown_view_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="pixelate, blur, blank, drop"):
        get_view("pixellate")


def test_pixelate_ratio_range():
    with pytest.raises(ValueError, match="ratio"):
        pixelate(_checker(), 0.0)


def test_drop_removes_image_parts_and_keeps_plain_text():
    parts = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}, {"type": "image"}]},
    ]
    dropped = drop_image_parts(parts)
    assert dropped == [parts[0], {"role": "user", "content": [{"type": "text", "text": "What?"}]}]
    assert len(parts[1]["content"]) == 3  # the row itself is untouched
    assert rows_without_text(
        [parts, [{"role": "user", "content": [{"type": "image"}]}], [{"role": "user", "content": " "}]]
    ) == [1, 2]
