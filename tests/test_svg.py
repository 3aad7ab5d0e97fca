"""Charts a newcomer reads: ticks at round numbers, labels not cut, a legend only for what is drawn."""
import re

from evaluation.report import chart_panels
from model.svg import bar_chart, line_chart, nice_ticks
from training.metrics import loss_svg


def test_ticks_fall_on_round_numbers_and_integer_axes_get_integers():
    assert nice_ticks(5.072, 5.767) == [5.0, 5.2, 5.4, 5.6, 5.8]
    assert nice_ticks(0, 3, 6, integer=True) == [0, 1, 2, 3]          # a 3-step run: no "2 2"
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    ticks = nice_ticks(1, 1000, 6, integer=True)
    assert ticks[0] <= 1 and ticks[-1] >= 1000 and len(set(ticks)) == len(ticks)


def test_loss_chart_labels_are_distinct_round_ticks_and_legend_follows_the_data():
    svg = loss_svg([{"kind": "train", "step": s, "loss": 5.767 - 0.2 * s} for s in (1, 2, 3)])
    x_labels = re.findall(r'text-anchor="middle">(\d+)</text>', svg)
    assert x_labels == sorted(set(x_labels), key=int)                  # no repeated step label
    assert "held-out" not in svg                                       # no dots promised
    with_eval = loss_svg([{"kind": "train", "step": 1, "loss": 2.0}, {"kind": "eval", "step": 1, "eval_loss": 2.1}])
    assert "held-out (red dots)" in with_eval and "<circle" in with_eval


def test_bar_chart_label_column_fits_the_longest_label():
    label = "detectable_content:number_placeholders"
    svg = bar_chart([([label], {"base": [0.1]}, "t", 1.0)])
    x = float(re.search(r'<text x="([\d.]+)" y="[\d.]+" text-anchor="end">' + label, svg).group(1))
    assert x >= 6.0 * len(label)  # the right-aligned label starts at x - width >= 0


def test_a_loss_only_evaluation_draws_the_loss_and_compare_plots_it_too():
    panels = chart_panels(["loss.loss", "loss.ppl", "loss.n_tokens"], {"m": [2.5, 12.2, 100]}, "")
    assert [p[2] for p in panels] == ["held-out loss (lower is better)"] and panels[0][0] == ["loss.loss"]
    both = chart_panels(["ifeval.prompt_strict", "loss.loss"], {"a": [0.2, 3.0], "b": [0.4, 2.0]}, "a vs b: ")
    assert [p[0] for p in both] == [["ifeval.prompt_strict"], ["loss.loss"]] and both[1][3] > 3.0
    assert "no metric to chart" in bar_chart([])
    assert "<polyline" not in line_chart([], [], "t", "x")
