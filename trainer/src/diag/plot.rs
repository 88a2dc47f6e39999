//! `trainer plot`: one PNG with the training loss and the kNN accuracy of one or more runs over
//! their steps, read from each run's `metrics.jsonl`, and an optional reference line (for
//! example the random backbone's kNN accuracy). Lines and axes are drawn with `plotters`; text
//! comes from the 8x8 bitmap font of `font8x8`, so no system font is needed.

use crate::error::{Error, IoContext, Result};
use font8x8::UnicodeFonts;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// What one run logged.
pub struct RunCurves {
    /// Legend name.
    pub name: String,
    /// (step, loss) of every step.
    pub loss: Vec<(f64, f64)>,
    /// (step, kNN top-1 %) of every kNN evaluation.
    pub knn: Vec<(f64, f64)>,
}

/// Reads `run/metrics.jsonl`: step lines carry `loss`, kNN lines `knn_top1`.
pub fn read_run(run: &Path, name: &str) -> Result<RunCurves> {
    let file = run.join(crate::train::pretrain::METRICS_FILE);
    let text = std::fs::read_to_string(&file).io("read", &file)?;
    let mut curves = RunCurves {
        name: name.to_string(),
        loss: Vec::new(),
        knn: Vec::new(),
    };
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::BadFile {
            path: file.clone(),
            message: format!("line {}: not JSON ({e})", i + 1),
        })?;
        let step = v["step"].as_f64();
        match (step, v["loss"].as_f64(), v["knn_top1"].as_f64()) {
            (Some(s), Some(loss), _) => curves.loss.push((s, loss)),
            (Some(s), _, Some(top1)) => curves.knn.push((s, top1)),
            _ => {}
        }
    }
    if curves.loss.is_empty() {
        return Err(Error::BadFile {
            path: file,
            message: "no training steps yet".into(),
        });
    }
    Ok(curves)
}

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 480;
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];
/// Pixels per font pixel.
const TEXT_SCALE: u32 = 2;
const MARGIN_LEFT: u32 = 80;
const MARGIN_BOTTOM: u32 = 50;
const MARGIN_TOP: u32 = 50;
const MARGIN_RIGHT: u32 = 40;

/// Text to stamp after plotters has drawn: (x, y, text), top-left anchored, in pixels.
type Labels = Vec<(i32, i32, String)>;

/// Draws the loss panel (left) and the kNN panel (right) of `runs` into a PNG at `out`
/// (written to a temporary name, then renamed). `reference` adds a dashed kNN line.
pub fn draw(runs: &[RunCurves], reference: Option<(&str, f64)>, out: &Path) -> Result<()> {
    if runs.is_empty() {
        return Err(Error::Plot("nothing to plot: give at least one run".into()));
    }
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    let mut labels = Labels::new();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let loss: Vec<&[(f64, f64)]> = runs.iter().map(|r| &r.loss[..]).collect();
        panel(&left, "training loss", &loss, runs, None, 0, &mut labels)?;
        let knn: Vec<&[(f64, f64)]> = runs.iter().map(|r| &r.knn[..]).collect();
        let half = (WIDTH / 2) as i32;
        panel(
            &right,
            "kNN top-1 (%)",
            &knn,
            runs,
            reference,
            half,
            &mut labels,
        )?;
        root.present().map_err(drawing("drawing the plot"))?;
    }
    let mut img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| Error::Plot("the plot buffer has the wrong size".into()))?;
    for (x, y, text) in &labels {
        stamp(&mut img, *x, *y, text);
    }
    let tmp = shared::fsutil::temp_path(out);
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Plot(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, out).io("write", out)?;
    Ok(())
}

/// One panel: axes, ticks, one line per run (runs without points are left out of it), the
/// optional reference line and a legend. `x0` is the panel's left edge in the image; `labels`
/// gets the panel's text in image coordinates.
fn panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    series: &[&[(f64, f64)]],
    runs: &[RunCurves],
    reference: Option<(&str, f64)>,
    x0: i32,
    labels: &mut Labels,
) -> Result<()> {
    let points = || series.iter().flat_map(|s| s.iter());
    let (mut y_lo, mut y_hi) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.1), b.max(p.1))
    });
    if let Some((_, r)) = reference {
        (y_lo, y_hi) = (y_lo.min(r), y_hi.max(r));
    }
    let x_hi = points().map(|p| p.0).fold(1.0, f64::max);
    let (w, h) = area.dim_in_pixel();
    labels.push((
        x0 + (w as i32 - text_width(title)) / 2,
        16,
        title.to_string(),
    ));
    if !y_lo.is_finite() {
        labels.push((x0 + w as i32 / 2 - 60, h as i32 / 2, "no points".into()));
        return Ok(());
    }
    let (y_ticks, y_lo, y_hi) = ticks(y_lo, y_hi);
    let (x_ticks, _, x_hi) = ticks(0.0, x_hi);
    let mut chart = ChartBuilder::on(area)
        .margin_top(MARGIN_TOP)
        .margin_bottom(MARGIN_BOTTOM)
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .build_cartesian_2d(0.0..x_hi, y_lo..y_hi)
        .map_err(drawing("plot axes"))?;
    let axis = BLACK.stroke_width(1);
    let grid = RGBColor(225, 225, 225).stroke_width(1);
    for &y in &y_ticks {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, y), (x_hi, y)],
                grid,
            )))
            .map_err(drawing("grid"))?;
        let (px, py) = chart.backend_coord(&(0.0, y));
        let text = tick_text(y);
        labels.push((px - 8 - text_width(&text), py - 8, text));
    }
    for &x in &x_ticks {
        let (px, py) = chart.backend_coord(&(x, y_lo));
        let text = tick_text(x);
        labels.push((px - text_width(&text) / 2, py + 8, text));
    }
    let (ax, ay) = chart.backend_coord(&(x_hi, y_lo));
    labels.push((ax - text_width("step"), ay + 28, "step".into()));
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, y_hi), (0.0, y_lo), (x_hi, y_lo)],
            axis,
        )))
        .map_err(drawing("axes"))?;
    let mut legend = Vec::new();
    for (i, (points, run)) in series.iter().zip(runs).enumerate() {
        if points.is_empty() {
            continue;
        }
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(drawing("line"))?;
        // Dots on short series (kNN evaluations), so that a series of one point shows too; a
        // long loss curve reads better as a line alone.
        let dots = if points.len() <= 60 { points.len() } else { 0 };
        chart
            .draw_series(
                points[..dots]
                    .iter()
                    .map(|&p| Circle::new(p, 3, colour.filled())),
            )
            .map_err(drawing("points"))?;
        legend.push((run.name.clone(), colour, false));
    }
    if let Some((name, r)) = reference {
        let dashes = (0..40).map(|k| {
            let a = x_hi * k as f64 / 40.0;
            PathElement::new(vec![(a, r), (a + x_hi / 80.0, r)], BLACK.stroke_width(2))
        });
        chart
            .draw_series(dashes)
            .map_err(drawing("reference line"))?;
        legend.push((name.to_string(), BLACK, true));
    }
    let (lx, ly) = chart.backend_coord(&(x_hi, y_hi));
    for (k, (name, colour, dashed)) in legend.iter().enumerate() {
        let y = ly + 12 + 20 * k as i32;
        let x = lx - 48 - text_width(name);
        // Plot coordinates are the image's; the area draws in its own.
        let (sx, len) = (x - x0, if *dashed { 10 } else { 28 });
        let swatch = vec![(sx, y + 8), (sx + len, y + 8)];
        area.draw(&PathElement::new(swatch, colour.stroke_width(3)))
            .map_err(drawing("legend"))?;
        labels.push((x + 38, y, name.clone()));
    }
    Ok(())
}

/// About five round tick values covering `lo..hi`, and the axis range they span.
fn ticks(lo: f64, hi: f64) -> (Vec<f64>, f64, f64) {
    let span = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
    let raw = span / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (lo / step).floor() * step;
    let last = (hi / step).ceil() * step;
    let last = if last > first { last } else { first + step };
    let n = ((last - first) / step).round() as usize;
    let values = (0..=n).map(|k| first + step * k as f64).collect();
    (values, first, last)
}

fn tick_text(v: f64) -> String {
    if v == v.round() {
        format!("{v:.0}")
    } else if (v * 10.0) == (v * 10.0).round() {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn text_width(text: &str) -> i32 {
    (text.chars().count() as u32 * 8 * TEXT_SCALE) as i32
}

/// Writes `text` in black with its top-left corner at (x, y); pixels outside the image are
/// skipped.
fn stamp(img: &mut image::RgbImage, x: i32, y: i32, text: &str) {
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS.get(ch).unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 0 {
                    continue;
                }
                for dy in 0..TEXT_SCALE {
                    for dx in 0..TEXT_SCALE {
                        let px = x + ((i as u32 * 8 + col) * TEXT_SCALE + dx) as i32;
                        let py = y + (row as u32 * TEXT_SCALE + dy) as i32;
                        if px >= 0
                            && py >= 0
                            && (px as u32) < img.width()
                            && (py as u32) < img.height()
                        {
                            img.put_pixel(px as u32, py as u32, image::Rgb([0, 0, 0]));
                        }
                    }
                }
            }
        }
    }
}

/// Turns a drawing error of `what` into the trainer's error.
fn drawing<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Plot(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_every_run_with_its_colour() {
        let t = tempfile::tempdir().unwrap();
        let mut runs = Vec::new();
        for (k, name) in ["a", "b"].iter().enumerate() {
            let dir = t.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            let mut text = String::new();
            for step in 1..=20 {
                let loss = 4.0 / step as f64 + k as f64;
                text += &format!("{{\"step\":{step},\"epoch\":0,\"loss\":{loss}}}\n");
                if step % 5 == 0 {
                    let top1 = 10.0 + step as f64 + 5.0 * k as f64;
                    text += &format!("{{\"step\":{step},\"knn_k\":20,\"knn_top1\":{top1}}}\n");
                }
            }
            std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
            let run = read_run(&dir, name).unwrap();
            assert_eq!((run.loss.len(), run.knn.len()), (20, 4));
            assert_eq!(run.knn[3], (20.0, 30.0 + 5.0 * k as f64));
            runs.push(run);
        }
        let out = t.path().join("plot.png");
        draw(&runs, Some(("random", 12.0)), &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        for (half, range) in [(0, 0..WIDTH / 2), (1, WIDTH / 2..WIDTH)] {
            for colour in &COLOURS[..2] {
                // The lower half: below the legend, so only a plotted line counts.
                let found = img.enumerate_pixels().any(|(x, y, p)| {
                    range.contains(&x) && y > HEIGHT / 2 && p.0 == [colour.0, colour.1, colour.2]
                });
                assert!(found, "panel {half} lacks a line of colour {colour:?}");
            }
        }

        std::fs::write(t.path().join("a/metrics.jsonl"), "").unwrap();
        let err = read_run(&t.path().join("a"), "a")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no training steps"), "{err}");
    }

    #[test]
    fn a_run_with_one_knn_point_shows_it() {
        let t = tempfile::tempdir().unwrap();
        let text = "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.5}\n\
                    {\"step\":2,\"knn_k\":20,\"knn_top1\":40.0}\n";
        std::fs::write(t.path().join("metrics.jsonl"), text).unwrap();
        let run = read_run(t.path(), "one").unwrap();
        assert_eq!(run.knn.len(), 1);
        let out = t.path().join("plot.png");
        draw(&[run], None, &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        let colour = COLOURS[0];
        let in_knn_panel = img.enumerate_pixels().any(|(x, y, p)| {
            x > WIDTH / 2 && y > HEIGHT / 4 && p.0 == [colour.0, colour.1, colour.2]
        });
        assert!(in_knn_panel, "the single kNN point is not drawn");
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, lo, hi) = ticks(0.0, 57.0);
        assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0]);
        assert_eq!((lo, hi), (0.0, 60.0));
        let (t, lo, hi) = ticks(1.12, 3.98);
        assert_eq!(t, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!((lo, hi), (1.0, 4.0));
        let (t, _, _) = ticks(0.61, 0.79);
        assert!(
            t.windows(2).all(|w| (w[1] - w[0] - 0.05).abs() < 1e-9),
            "{t:?}"
        );
    }
}
