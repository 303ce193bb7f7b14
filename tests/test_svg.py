"""pipeline/report/svg.py, the run pages' hand-drawn charts: data mapped to pixels, ticks, log
labels, gaps at NaN, what a drawing escapes."""

import re

import numpy as np

from pipeline.report import svg


def test_a_panel_maps_data_onto_its_rectangle_y_growing_upwards():
    panel = svg.Panel(10, 20, 100, 50, xlim=(0, 4), ylim=(-1, 1))
    np.testing.assert_allclose(panel.px([0, 2, 4]), [10, 60, 110])
    np.testing.assert_allclose(panel.py([-1, 0, 1]), [70, 45, 20])
    panel.line([0, 4], [-1, 1], "red")
    (points,) = re.findall(r'<polyline points="([^"]+)"', panel.svg())
    assert points == "10.0,70.0 110.0,20.0"


def test_a_nan_is_a_gap_in_a_line_not_a_zero():
    panel = svg.Panel(0, 0, 100, 100, xlim=(0, 4), ylim=(-1, 1))
    panel.line([0, 1, 2, 3, 4], [0.5, 1, np.nan, 0.5, 1], "red")
    lines = re.findall(r'<polyline points="([^"]+)"', panel.svg())
    assert lines == ["0.0,25.0 25.0,0.0", "75.0,25.0 100.0,0.0"]  # y = 0 would be at 50.0
    lone = svg.Panel(0, 0, 100, 100, xlim=(0, 4), ylim=(-1, 1))
    lone.line([0, 1, 2], [np.nan, 0.0, np.inf], "red")  # one finite point: a dot, or it is not seen
    assert "<polyline" not in lone.svg() and lone.svg().count('<circle cx="25.0" cy="50.0"') == 1


def test_ticks_are_round_values_inside_the_range():
    np.testing.assert_allclose(svg.ticks(-1, 1), [-0.8, -0.4, 0.0, 0.4, 0.8])
    assert list(svg.ticks(0, 14, integer=True)) == [0, 3, 6, 9, 12]
    assert list(svg.ticks(-0.3, 7.3)) == [0, 2, 4, 6]  # those of the locator's that fall inside
    assert [svg.label(t) for t in svg.ticks(-1, 1)] == ["-0.8", "-0.4", "0", "0.4", "0.8"]  # no "-0"


def test_limits_pad_the_finite_range_and_give_one_value_a_height():
    assert svg.limits([0, 10], pad=0.1) == (-1.0, 11.0)
    assert svg.limits([np.nan, np.inf]) == (0.0, 1.0) and svg.limits([3, 3]) == (2.5, 3.5)
    lo, hi = svg.limits([5.4e18])  # a diverged run's one finite loss: the panel still has a height
    assert lo < 5.4e18 < hi and np.isfinite(svg.Panel(0, 0, 10, 10, (0, 1), (lo, hi)).py(5.4e18))


def test_a_log_axis_labels_its_ticks_with_the_values_themselves():
    assert svg.power_label(-2) == "0.01" and svg.power_label(np.log10(2)) == "2" and svg.power_label(0) == "1"
    assert list(map(svg.power_label, svg.log_ticks(np.log10(0.12), np.log10(2.2)))) == ["0.2", "0.5", "1", "2"]
    assert list(map(svg.power_label, svg.log_ticks(0, 18.7))) == ["1", "10000", "1e+08", "1e+12", "1e+16"]
    panel = svg.Panel(0, 0, 100, 100, (0, 1), (np.log10(0.12), np.log10(2.2)))
    panel.frame(ylabel="loss", log_y=True)
    labels = re.findall(r'text-anchor="end" fill="#222" font-weight="normal">([^<]+)</text>', panel.svg())
    assert labels == ["0.2", "0.5", "1", "2"]


def test_a_heatmap_is_one_pixel_per_cell_row_0_at_the_bottom():
    import base64
    import io

    import matplotlib.image

    panel = svg.Panel(0, 0, 40, 20, (0, 2), (-0.5, 1.5))
    panel.image(np.array([[0.0, 1.0], [2.0, np.nan]]), (0, 2, -0.5, 1.5), "magma", 0.0, 2.0)
    encoded = re.search(r'href="data:image/png;base64,([^"]+)"', panel.svg()).group(1)
    pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(encoded)), format="png")
    assert pixels.shape == (2, 2, 4)
    magma = matplotlib.colormaps["magma"]
    np.testing.assert_allclose(pixels[1, :2], [magma(0.0), magma(0.5)], atol=1 / 255)  # row 0, drawn at the bottom
    np.testing.assert_allclose(pixels[0, 0], magma(1.0), atol=1 / 255)
    assert pixels[0, 1, 3] == 0  # NaN: transparent


def test_a_drawing_escapes_its_texts():
    drawing = svg.document(100, 50, [svg.text(10, 10, "<script>x</script>")], 'a "title" <b>')
    assert "<script>" not in drawing and "&lt;script&gt;" in drawing
    assert 'aria-label="a &quot;title&quot; &lt;b&gt;"' in drawing
