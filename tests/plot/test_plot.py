"""minitrain/plot/ and minitrain/rundir.py: safe reading of live metrics files, x-axes, smoothing, the image
and the terminal plot."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from rich.console import Console

from minitrain.config import PlotConfig
from minitrain.errors import UserError
from minitrain.plot import plot, watch
from minitrain.plot.curves import DEFAULT_METRICS, Curves, build_curves, ema
from minitrain.plot.image import decimate, draw_image, envelope
from minitrain.plot.read import run_names
from minitrain.plot.terminal import _BRAILLE_BITS, _Canvas, nice_ticks, tick_labels
from minitrain.rundir import METRICS_FILE, MetricsFile


def metrics_rows(n: int, *, lr: float = 1e-4, eval_every: int = 0, seed: int = 0) -> list[dict]:
    """Rows shaped like `minitrain train` writes them, with eval rows holding only step/eval_loss/samples."""
    rng = np.random.default_rng(seed)
    rows, samples = [], 0
    for step in range(1, n + 1):
        samples += 4
        rows.append(
            {
                "step": step,
                "lr": lr * min(1.0, step / 5),
                "grad_norm": float(1 + rng.random()),
                "loss": float(3 * math.exp(-step / 20) + 0.1 * rng.random()),
                "num_samples": 4,
                "num_loss_counted_tokens": 300,
                "num_total_tokens": 500 + step,
                "time_per_batch": 0.25,
                "tokens_per_second": float(2000 + rng.random()),
                "total_samples_accumulated": samples,
                "epoch": 0,
                "timestamp": 1_700_000_000.0 + 0.25 * step,
            }
        )
        if eval_every and step % eval_every == 0:
            rows.append({"step": step, "eval_loss": 2.0 - step / 100, "total_samples_accumulated": samples})
    return rows


def write_metrics(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def run_dir(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    write_metrics(tmp_path / name / METRICS_FILE, rows)
    return tmp_path / name


def curves(paths: list[Path], **config) -> Curves:
    return plot(PlotConfig(runs=tuple(paths), **config)).curves


# ---------------------------------------------------------------------------------------------------
# Reading


def test_incomplete_last_line_is_skipped_then_read_when_finished(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(3))
    last = orjson.dumps(metrics_rows(4)[3]) + b"\n"
    with open(path, "ab") as f:
        f.write(last[:25])  # the writer is half-way through step 4
    reader = MetricsFile(path)
    assert reader.refresh()
    assert [r["step"] for r in reader.rows] == [1, 2, 3]
    assert not reader.refresh()  # nothing new
    with open(path, "ab") as f:
        f.write(last[25:])
    assert reader.refresh()
    assert [r["step"] for r in reader.rows] == [1, 2, 3, 4]
    assert reader.rows[3] == metrics_rows(4)[3]


def test_last_line_without_newline_that_parses_is_kept_once(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}')
    reader = MetricsFile(path)
    reader.refresh()
    assert [r["step"] for r in reader.rows] == [1, 2]
    with open(path, "ab") as f:
        f.write(b'\n{"step": 3, "loss": 1.0}\n')
    reader.refresh()
    assert [r["step"] for r in reader.rows] == [1, 2, 3]


def test_malformed_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": \n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(UserError, match=rf"{path}:3: not a JSON line"):
        MetricsFile(path).refresh()


def test_a_line_that_is_not_an_object_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n[1, 2]\n')
    with pytest.raises(UserError, match=rf"{path}:2: expected a JSON object"):
        MetricsFile(path).refresh()


def test_nan_written_by_python_json_is_read_and_not_drawn(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in [(1, 2.0), (2, math.nan), (3, 1.0)])
    )
    c = curves([path])
    (line,) = c.panels[0].lines
    assert line.x.tolist() == [1, 3] and line.y.tolist() == [2.0, 1.0]


def test_a_rewritten_file_is_read_from_the_start(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(5))
    reader = MetricsFile(path)
    reader.refresh()
    write_metrics(path, metrics_rows(2, lr=1.0))
    assert reader.refresh()
    assert len(reader.rows) == 2 and reader.rows[0]["lr"] == pytest.approx(0.2)


def test_a_new_run_rewriting_the_file_is_noticed_even_when_it_grew_past_the_old_one(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(3))
    reader = MetricsFile(path)
    reader.refresh()
    write_metrics(path, metrics_rows(6, lr=1.0))  # truncated and rewritten between two polls
    reader.refresh()
    assert [r["step"] for r in reader.rows] == [1, 2, 3, 4, 5, 6]
    assert reader.rows[0]["lr"] == pytest.approx(0.2)


def test_missing_run_and_directory_without_metrics_are_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        plot(PlotConfig(runs=(tmp_path / "nope",)))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match=f"has no {METRICS_FILE}"):
        plot(PlotConfig(runs=(tmp_path / "empty_dir",)))


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        plot(PlotConfig(runs=(path,)))
    path.write_bytes(b'{"step": 1, "lo')  # only an incomplete line: still nothing to draw
    with pytest.raises(UserError, match="is empty"):
        plot(PlotConfig(runs=(path,)))


def test_unknown_metric_lists_the_available_ones(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(3))
    with pytest.raises(UserError, match=r"unknown metric 'los'; available: .*grad_norm, loss, lr") as err:
        plot(PlotConfig(runs=(path,), metrics=("los",)))
    assert "\n" not in str(err.value)


def test_no_default_metric_present(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", [{"step": 1, "accuracy": 0.5}])
    with pytest.raises(UserError, match="pick some with --metric: accuracy, step"):
        plot(PlotConfig(runs=(path,)))


def test_runs_without_a_common_x_axis(tmp_path):
    a = run_dir(tmp_path, "a", metrics_rows(3))
    b = run_dir(
        tmp_path,
        "b",
        [{k: v for k, v in r.items() if k != "total_samples_accumulated"} for r in metrics_rows(3)],
    )
    with pytest.raises(
        UserError, match=r"no common x-axis for --x samples: b has no 'total_samples_accumulated'"
    ):
        plot(PlotConfig(runs=(a, b), x="samples"))
    c = run_dir(tmp_path, "c", [{"loss": 1.0}, {"loss": 0.5}])
    with pytest.raises(UserError, match="no x-axis is shared by all of these runs"):
        plot(PlotConfig(runs=(a, c)))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(x="epoch"), "is not an x-axis"),
        (dict(smooth=0.995), "out of range"),
        (dict(smooth=-0.1), "out of range"),
        (dict(output=Path("curves.jpg")), "unknown image type"),
    ],
)
def test_config_validation(config, message):
    with pytest.raises(UserError, match=message):
        PlotConfig(runs=(Path("x"),), **config)


# ---------------------------------------------------------------------------------------------------
# Names, x-axes, smoothing


def test_run_names_are_dir_names_or_stems_made_unique(tmp_path):
    a = run_dir(tmp_path / "lr1", "out", metrics_rows(1))
    b = run_dir(tmp_path / "lr2", "out", metrics_rows(1))
    f = write_metrics(tmp_path / "baseline.jsonl", metrics_rows(1))
    assert run_names([a, b, f, a / METRICS_FILE]) == [
        "lr1/out",
        "lr2/out",
        "baseline",
        "lr1/out (2)",
    ]
    assert run_names([a / METRICS_FILE]) == ["out"]


def test_x_axes(tmp_path):
    rows = metrics_rows(4, eval_every=2)
    path = write_metrics(tmp_path / "m.jsonl", rows)
    train = [r for r in rows if "loss" in r]

    def loss_and_eval_x(axis: str) -> tuple[list, list]:
        loss, ev = curves([path], x=axis, metrics=("loss",)).panels[0].lines
        return loss.x.tolist(), ev.x.tolist()

    assert loss_and_eval_x("step") == ([1, 2, 3, 4], [2, 4])
    assert loss_and_eval_x("samples") == ([4, 8, 12, 16], [8, 16])
    tokens = np.cumsum([r["num_total_tokens"] for r in train]).tolist()
    assert loss_and_eval_x("tokens") == (tokens, [tokens[1], tokens[3]])  # eval rows add no tokens
    assert loss_and_eval_x("time") == (
        [0, 0.25, 0.5, 0.75],
        [0.25, 0.75],
    )  # eval rows: time of the step before


def test_time_axis_from_iso_timestamps_picks_a_unit(tmp_path):
    rows = [{"step": i, "loss": 1.0, "timestamp": f"2026-01-01T{i:02d}:00:00Z"} for i in range(4)]
    c = curves([write_metrics(tmp_path / "m.jsonl", rows)], x="time")
    assert c.x_label == "time (h)"
    assert c.panels[0].lines[0].x.tolist() == [0, 1, 2, 3]


def test_time_axis_falls_back_to_time_per_batch(tmp_path):
    rows = [{"step": i, "loss": 1.0, "time_per_batch": 0.5} for i in range(3)]
    c = curves([write_metrics(tmp_path / "m.jsonl", rows)], x="time")
    assert c.x_label == "time (s)" and c.panels[0].lines[0].x.tolist() == [0.5, 1.0, 1.5]


def ema_reference(y: list[float], w: float) -> list[float]:
    """The debiased EMA is the average of y[:t+1] weighted by w^(t-k)."""
    out = []
    for t in range(len(y)):
        weights = [w ** (t - k) for k in range(t + 1)]
        out.append(sum(wk * yk for wk, yk in zip(weights, y[: t + 1], strict=True)) / sum(weights))
    return out


@pytest.mark.parametrize("w", [0.0, 0.3, 0.9, 0.99])
def test_ema_matches_the_weighted_average(w):
    y = np.random.default_rng(1).normal(size=200)
    np.testing.assert_allclose(ema(y, w), ema_reference(y.tolist(), w), rtol=1e-10, atol=1e-12)


def test_smoothing_applies_to_measurements_not_to_lr_or_eval(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(30, eval_every=10))
    c = curves([path], smooth=0.8)
    by_metric = {(p.metric, ln.metric): ln for p in c.panels for ln in p.lines}
    loss = by_metric[("loss", "loss")]
    np.testing.assert_allclose(loss.smoothed, ema_reference(loss.y.tolist(), 0.8))
    assert by_metric[("loss", "eval_loss")].smoothed is None
    assert by_metric[("lr", "lr")].smoothed is None
    assert by_metric[("grad_norm", "grad_norm")].smoothed is not None
    assert curves([path]).panels[0].lines[0].smoothed is None  # --smooth 0: no smoothing


def test_default_panels_put_eval_loss_with_loss(tmp_path):
    a = run_dir(tmp_path, "a", metrics_rows(20, eval_every=5))
    b = run_dir(tmp_path, "b", metrics_rows(20))
    c = curves([a, b])
    assert [p.metric for p in c.panels] == list(DEFAULT_METRICS)
    assert [(ln.run, ln.metric) for ln in c.panels[0].lines] == [
        ("a", "loss"),
        ("a", "eval_loss"),
        ("b", "loss"),
    ]
    assert all(len(p.lines) == 2 for p in c.panels[1:])
    assert [ln.y.tolist() for ln in c.panels[0].lines if ln.is_eval] == [[1.95, 1.9, 1.85, 1.8]]
    # eval_loss asked for by name gets a panel of its own
    assert [p.metric for p in curves([a, b], metrics=("loss", "eval_loss")).panels] == ["loss", "eval_loss"]
    assert [ln.metric for ln in curves([a, b], metrics=("loss", "eval_loss")).panels[0].lines] == [
        "loss",
        "loss",
    ]


def dpo_rows(n: int, *, eval_every: int = 0) -> list[dict]:
    """Rows of a `--objective dpo` run: the step keys plus rewards/..., eval rows with eval_rewards/..."""
    rows = metrics_rows(n, eval_every=eval_every)
    for row in rows:
        step = row["step"]
        if "loss" in row:
            row.update({"rewards/margins": step / 10, "rewards/accuracies": min(1.0, 0.5 + step / 40)})
        else:
            row.update({"eval_rewards/margins": step / 20, "eval_rewards/accuracies": 0.25 + step / 100})
    return rows


def test_a_preference_run_gets_margins_and_accuracies_after_the_loss(tmp_path):
    dpo = run_dir(tmp_path, "dpo", dpo_rows(20, eval_every=5))
    sft = run_dir(tmp_path, "sft", metrics_rows(20, eval_every=5))
    want = ["loss", "rewards/margins", "rewards/accuracies", *DEFAULT_METRICS[1:]]
    c = curves([dpo, sft])
    assert [p.metric for p in c.panels] == want
    panels = {p.metric: p for p in c.panels}
    assert [(ln.run, ln.metric) for ln in panels["rewards/margins"].lines] == [
        ("dpo", "rewards/margins"),
        ("dpo", "eval_rewards/margins"),  # the eval pairs' margins on the same panel, as eval_loss on loss
    ]
    assert panels["rewards/margins"].lines[0].y.tolist() == [s / 10 for s in range(1, 21)]
    assert panels["rewards/accuracies"].lines[1].y.tolist() == [0.3, 0.35, 0.4, 0.45]
    assert panels["rewards/accuracies"].lines[1].is_eval and c.eval_legend() == "eval_*"
    # an SFT run alone keeps its panels and legend
    alone = curves([sft])
    assert [p.metric for p in alone.panels] == list(DEFAULT_METRICS) and alone.eval_legend() == "eval_loss"
    # the terminal and the image draw the new panels
    lines = render(plot(PlotConfig(runs=(dpo,))).terminal).splitlines()
    assert all(any(line.strip() == metric for line in lines) for metric in want)
    assert "● eval_*" in lines[0]
    figure = plot(PlotConfig(runs=(dpo,), output=tmp_path / "dpo.png")).figure
    assert [ax.get_title() for ax in figure.axes] == want


def test_decimate_keeps_the_envelope_in_order():
    rng = np.random.default_rng(0)
    x = np.arange(100_003, dtype=float)
    y = rng.normal(size=x.size)
    dx, dy = decimate(x, y, buckets=1000)
    assert len(dx) <= 4 * 1001 and np.all(np.diff(dx) > 0)
    assert (dx[0], dx[-1]) == (0, 100_002) and dy.min() == y.min() and dy.max() == y.max()
    k = math.ceil(x.size / 1000)
    for start in range(0, x.size, k):  # every block's extremes survive
        block = slice(start, start + k)
        kept = dy[(dx >= start) & (dx < start + k)]
        assert kept.min() == y[block].min() and kept.max() == y[block].max()
    short_x, short_y = x[:100], y[:100]  # at most 4 points per bucket: returned as they are
    kept_x, kept_y = decimate(short_x, short_y)
    assert kept_x is short_x and kept_y is short_y and len(kept_x) == 100


# ---------------------------------------------------------------------------------------------------
# Image


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_image_is_written_with_a_panel_per_metric_and_a_line_per_run(tmp_path, suffix):
    a = run_dir(tmp_path, "a", metrics_rows(50, eval_every=10))
    b = run_dir(tmp_path, "b", metrics_rows(50, lr=3e-4, seed=1))
    out = tmp_path / f"curves{suffix}"
    result = plot(PlotConfig(runs=(a, b), output=out, smooth=0.6))
    assert out.stat().st_size > 1000 and result.terminal is None
    axes = result.figure.axes
    assert [ax.get_title() for ax in axes] == list(DEFAULT_METRICS)
    assert all(ax.get_xlabel() == "step" for ax in axes)
    gids = [[line.get_gid() for line in ax.get_lines()] for ax in axes]
    assert gids[0] == ["a:loss:raw", "a:loss", "a:eval_loss", "b:loss:raw", "b:loss"]
    assert gids[1] == ["a:lr", "b:lr"]  # lr is never smoothed
    assert gids[2] == ["a:grad_norm:raw", "a:grad_norm", "b:grad_norm:raw", "b:grad_norm"]
    raw = axes[0].get_lines()[0]
    assert raw.get_alpha() < 0.5 and raw.get_color() == axes[0].get_lines()[1].get_color()
    legend = [t.get_text() for t in result.figure.legends[0].get_texts()]
    assert legend == ["a", "b", "eval_loss"]
    if suffix == ".png":
        from PIL import Image

        with Image.open(out) as im:
            im.verify()
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        pixels = matplotlib.image.imread(out)
        assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.std() > 0
    elif suffix == ".svg":
        assert b"<svg" in out.read_bytes()[:2000]
    else:
        assert out.read_bytes()[:5] == b"%PDF-"
    assert not list(tmp_path.glob(".curves*"))  # the temporary file was renamed away


def test_dense_raw_curve_becomes_its_min_max_band(tmp_path):
    rows = metrics_rows(100)
    path = write_metrics(tmp_path / "m.jsonl", rows)
    c = curves([path], metrics=("grad_norm",), smooth=0.9)
    fig = draw_image(c, tmp_path / "c.png", buckets=10)  # 100 points > 4 x 10 buckets: dense
    (band,) = fig.axes[0].collections
    assert band.get_gid() == "m:grad_norm:raw"
    verts = band.get_paths()[0].vertices
    raw = [r["grad_norm"] for r in rows]
    assert verts[:, 1].min() == min(raw) and verts[:, 1].max() == max(raw)
    assert verts[:, 0].min() == 1 and verts[:, 0].max() == 100
    (smoothed,) = fig.axes[0].get_lines()
    assert smoothed.get_gid() == "m:grad_norm" and len(smoothed.get_xdata()) <= 44


def test_envelope_matches_blocks():
    x = np.arange(10.0)
    y = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3.0])
    ex, lo, hi = envelope(x, y, buckets=4)  # blocks of 3: [3 1 4] [1 5 9] [2 6 5] [3]
    assert ex.tolist() == [0, 3, 6, 9, 9]
    assert lo.tolist() == [1, 1, 2, 3, 3] and hi.tolist() == [4, 9, 6, 3, 3]


def test_image_lines_carry_the_data(tmp_path):
    rows = metrics_rows(10)
    out = tmp_path / "c.png"
    fig = plot(
        PlotConfig(runs=(write_metrics(tmp_path / "m.jsonl", rows),), metrics=("lr",), output=out)
    ).figure
    (line,) = fig.axes[0].get_lines()
    assert line.get_xdata().tolist() == list(range(1, 11))
    assert line.get_ydata().tolist() == [r["lr"] for r in rows]


def test_a_run_with_a_single_step_is_marked(tmp_path):
    one = write_metrics(tmp_path / "one.jsonl", metrics_rows(1))
    out = tmp_path / "c.png"
    result = plot(PlotConfig(runs=(one,), metrics=("loss",), smooth=0.5, output=out, terminal=True))
    (line,) = result.figure.axes[0].get_lines()
    assert line.get_marker() == "o" and line.get_gid() == "one:loss"
    assert "●" in render(result.terminal)


def test_image_into_a_missing_directory_is_an_error(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(3))
    with pytest.raises(UserError, match="does not exist; create it first"):
        plot(PlotConfig(runs=(path,), output=tmp_path / "nope" / "c.png"))
    with pytest.raises(UserError, match="does not exist; create it first"):  # refused before reading a run
        PlotConfig(runs=(tmp_path / "never-read",), output=tmp_path / "nope" / "c.png")
    curves = build_curves([("m", metrics_rows(3))], PlotConfig(runs=(path,), metrics=("loss",)))
    with pytest.raises(UserError, match=r"cannot write the image \(No such file or directory\)"):
        draw_image(curves, tmp_path / "nope" / "c.png")  # the library entry point, without a config
    assert not (tmp_path / "nope").exists()


# ---------------------------------------------------------------------------------------------------
# Terminal


def render(renderable, width: int = 100) -> str:
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_terminal_plot_has_titles_axis_labels_ticks_and_legend(tmp_path):
    a = run_dir(tmp_path, "run-a", metrics_rows(100, eval_every=25))
    b = run_dir(tmp_path, "run-b", metrics_rows(100, lr=3e-4, seed=1))
    result = plot(PlotConfig(runs=(a, b), smooth=0.9, x="samples"))
    assert result.figure is None and result.output is None
    text = render(result.terminal)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines)
    for metric in DEFAULT_METRICS:
        assert any(line.strip() == metric for line in lines), metric
    assert sum(line.strip() == "samples" for line in lines) == 4  # the x label under every panel
    assert (
        "━━ run-a" in lines[0]
        and "━━ run-b" in lines[0]
        and "● eval_loss" in lines[0]
        and "EMA 0.9" in lines[0]
    )
    assert "●" in "\n".join(lines[1:])  # eval points are marked
    assert "400" in text and "3e-4" in text  # an x tick (samples) and a y tick of lr
    assert any(0x2800 < ord(ch) <= 0x28FF for ch in text)  # braille curves


def test_terminal_plot_puts_two_panels_per_row_when_wide(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(30))
    term = plot(PlotConfig(runs=(path,))).terminal
    lines = render(term, width=160).splitlines()
    assert any("loss" in line and "lr" in line for line in lines)
    assert all(len(line) <= 160 for line in lines)
    assert len(lines) < len(render(term, width=100).splitlines())


def test_canvas_draws_a_connected_line():
    """A straight line crosses every dot column, at the row the line passes there (± 1 dot)."""
    canvas = _Canvas(20, 5, (0.0, 1.0), (0.0, 1.0))
    canvas.line(np.array([0.0, 0.3, 1.0]), np.array([0.0, 0.3, 1.0]), "red")
    dots = np.zeros((20, 40), dtype=bool)  # decode the braille cells back into dots
    for r in range(5):
        for c in range(20):
            for (dr, dc), bit in np.ndenumerate(_BRAILLE_BITS):
                dots[4 * r + dr, 2 * c + dc] = bool(canvas.bits[r, c] & bit)
    for col in range(40):
        rows = np.flatnonzero(dots[:, col])
        expected = 19 - col * 19 / 39  # y = x, top row is y = 1
        assert rows.size and rows.min() - 1 <= expected <= rows.max() + 1, (col, rows, expected)
    assert dots.sum() < 80  # a thin line, not a filled area


@pytest.mark.parametrize(
    ("lo", "hi", "n", "ticks", "labels"),
    [
        (0.0, 1.0, 5, [0, 0.25, 0.5, 0.75, 1.0], ["0", "0.25", "0.50", "0.75", "1.00"]),
        (1.0, 500.0, 6, [100, 200, 300, 400, 500], ["100", "200", "300", "400", "500"]),
        (0.0, 2e-5, 3, [0, 1e-5, 2e-5], ["0", "1e-5", "2e-5"]),
        (0.0, 2.2e6, 4, [0, 1e6, 2e6], ["0", "1M", "2M"]),
        (8000.0, 12000.0, 3, [8000, 10000, 12000], ["8k", "10k", "12k"]),
    ],
)
def test_ticks(lo, hi, n, ticks, labels):
    got = nice_ticks(lo, hi, n)
    np.testing.assert_allclose(got, ticks)
    assert tick_labels(got) == labels


# ---------------------------------------------------------------------------------------------------
# Watch


def test_watch_redraws_when_the_file_grows(tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # the run has started; its metrics file does not exist yet
    path = out / METRICS_FILE
    lines = [orjson.dumps(r) + b"\n" for r in metrics_rows(6)]
    writes = iter(
        [b"", lines[0] + lines[1][:10], lines[1][10:] + lines[2], b"", lines[3] + lines[4] + lines[5]]
    )

    def sleep(seconds: float) -> None:  # the training job writes between polls
        assert seconds == 0.5
        with open(path, "ab") as f:
            f.write(next(writes))

    frames = list(
        watch(PlotConfig(runs=(out,), metrics=("loss",)), interval=0.5, max_iterations=6, sleep=sleep)
    )
    steps = [frame.curves.panels[0].lines[0].x.tolist() for frame in frames]
    assert steps == [[1], [1, 2, 3], [1, 2, 3, 4, 5, 6]]
    assert all(frame.terminal is not None for frame in frames)


def test_watch_rewrites_the_image(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(3))
    out = tmp_path / "c.png"
    config = PlotConfig(runs=(path,), output=out)
    frames = watch(config, interval=0, max_iterations=2, sleep=lambda s: write_metrics(path, metrics_rows(8)))
    assert len(next(frames).figure.axes[0].get_lines()[0].get_xdata()) == 3
    assert len(next(frames).figure.axes[0].get_lines()[0].get_xdata()) == 8
    assert next(frames, None) is None
    assert out.exists()


def test_watch_still_rejects_a_run_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        next(watch(PlotConfig(runs=(tmp_path / "nope",)), max_iterations=1))
