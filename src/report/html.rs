//! Renders a [`ReportData`] as one self-contained HTML page (inline SVG charts drawn with
//! plotters; no external files or scripts), plus a short terminal summary.
//!
//! Charts: loss and validation-metric curves per epoch (for an ensemble, each member's side by
//! side, with a table of the members), per-label F1 and AP bars (with support), the micro
//! precision-recall curve and the label co-occurrence heat-map; the error gallery; a per-label
//! table with the tuned thresholds.

use std::fmt::Write as _;

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor;

use super::{ReportData, escape, gallery};
use crate::metrics::LabelMetrics;
use crate::train::ensemble::MemberRun;
use crate::train::history::EpochRecord;

const WIDTH: u32 = 760;
const ROW_PX: u32 = 18;
/// The size of a run's curves, and of the small ones side by side (ensemble members, sweeps).
pub(super) const CURVE: (u32, u32) = (620, 340);
pub(super) const SMALL_CURVE: (u32, u32) = (400, 250);

/// Renders the whole report as one HTML string.
pub fn render_html(data: &ReportData) -> Result<String> {
    let mut html = String::new();
    let title = escape(&data.title);
    write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>{STYLE}{}</style></head><body><h1>{title}</h1>",
        gallery::STYLE
    )?;
    html.push_str("<div class=\"cards\">");
    for (name, value) in &data.metrics {
        write!(
            html,
            "<div class=\"card\"><div class=\"v\">{value:.4}</div><div class=\"k\">{}</div></div>",
            escape(name)
        )?;
    }
    html.push_str("</div><table class=\"facts\">");
    for (k, v) in &data.facts {
        write!(
            html,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(k),
            escape(v)
        )?;
    }
    html.push_str("</table>");

    if !data.history.is_empty() {
        html.push_str("<h2>Training curves</h2><div class=\"row\">");
        html.push_str(&loss_chart(&data.history, CURVE)?);
        html.push_str(&metric_chart("Validation metrics", &data.history, CURVE)?);
        html.push_str("</div>");
    }
    if !data.members.is_empty() {
        html.push_str(&members(&data.members)?);
    }
    let labels = label_rows(data);
    if !labels.is_empty() {
        html.push_str("<h2>Per label</h2><p>Sorted by support (validation positives). Bars: F1 at the tuned threshold and average precision.</p>");
        html.push_str(&label_bars(&labels)?);
    }
    if !data.pr_curve.is_empty() || !data.cooccurrence.is_empty() {
        html.push_str("<div class=\"row\">");
        if !data.pr_curve.is_empty() {
            html.push_str("<div><h2>Precision-recall (micro)</h2>");
            html.push_str(&pr_chart(&data.pr_curve)?);
            html.push_str("</div>");
        }
        html.push_str("</div>");
        if !data.cooccurrence.is_empty() {
            html.push_str("<h2>Label co-occurrence (training)</h2><p>Cell (row i, column j) = P(label j | label i).</p>");
            html.push_str(&heatmap(&data.label_names, &data.cooccurrence)?);
        }
    }
    if let Some(gallery) = &data.gallery {
        html.push_str(gallery);
    }
    if !labels.is_empty() {
        html.push_str("<h2>Per-label table</h2>");
        html.push_str(&label_table(&labels));
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

/// One label's name and scores.
struct LabelRow<'a> {
    name: &'a str,
    metrics: &'a LabelMetrics,
}

/// The labels, most frequent first (ties by name).
fn label_rows(data: &ReportData) -> Vec<LabelRow<'_>> {
    let mut rows: Vec<LabelRow> = data
        .per_label
        .iter()
        .map(|metrics| LabelRow {
            name: data
                .label_names
                .get(metrics.label)
                .map_or("?", String::as_str),
            metrics,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.metrics
            .support
            .cmp(&a.metrics.support)
            .then(a.name.cmp(b.name))
    });
    rows
}

/// A few lines for the terminal: headline metrics and the weakest labels.
pub fn terminal_summary(data: &ReportData) -> String {
    let mut out = String::new();
    for (name, value) in &data.metrics {
        let _ = writeln!(out, "  {name:<12} {value:.4}");
    }
    let mut weakest: Vec<LabelRow> = label_rows(data)
        .into_iter()
        .filter(|l| l.metrics.support > 0)
        .collect();
    weakest.sort_by(|a, b| a.metrics.f1.total_cmp(&b.metrics.f1));
    if !weakest.is_empty() {
        let names: Vec<String> = weakest
            .iter()
            .take(3)
            .map(|l| format!("{} ({:.2}, n={})", l.name, l.metrics.f1, l.metrics.support))
            .collect();
        let _ = writeln!(out, "  weakest labels: {}", names.join(", "));
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1600px;margin:24px auto;padding:0 16px;color:#222}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px}\
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:8px 16px}\
.card .v{font-size:22px;font-weight:600}.card .k{color:#666;font-size:13px}\
.row{display:flex;gap:16px;flex-wrap:wrap}\
table{border-collapse:collapse;font-size:13px;margin-top:12px}th,td{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}\
td.n{text-align:right;font-variant-numeric:tabular-nums}";

/// Runs `draw` on an SVG drawing area of the given size and returns the SVG markup.
fn svg(
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    Ok(out)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a report chart: {e:?}")
}

/// The axes of a line chart.
struct Axes<'a> {
    x: &'a str,
    y: &'a str,
    x_range: (f64, f64),
    y_range: (f64, f64),
    /// Label the x axis with whole numbers (epochs).
    whole_x: bool,
    legend: SeriesLabelPosition,
}

/// One line of a chart: name, colour, points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// Draws lines on one chart with a legend.
fn line_chart(title: &str, axes: Axes, lines: &[Series], size: (u32, u32)) -> Result<String> {
    let (x_range, y_range) = (axes.x_range, axes.y_range);
    svg(size.0, size.1, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .x_label_formatter(&|x| {
                if axes.whole_x {
                    format!("{x:.0}")
                } else {
                    format!("{x:.1}")
                }
            })
            .draw()
            .map_err(plot_err)?;
        for (name, colour, points) in lines {
            let style = colour.stroke_width(2);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), style))
                .map_err(plot_err)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        chart
            .configure_series_labels()
            .position(axes.legend)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })
}

/// The main stage's records (warm-up stages restart their epoch count).
fn main_stage(history: &[EpochRecord]) -> Vec<&EpochRecord> {
    history.iter().filter(|r| r.stage == "train").collect()
}

fn epoch_range(history: &[&EpochRecord]) -> (f64, f64) {
    let first = history.first().map_or(0, |p| p.epoch) as f64;
    let last = history.last().map_or(1, |p| p.epoch) as f64;
    (first, last.max(first + 1.0))
}

/// Training and validation loss per epoch of the main stage.
pub(super) fn loss_chart(history: &[EpochRecord], size: (u32, u32)) -> Result<String> {
    let history = main_stage(history);
    let train: Vec<(f64, f64)> = history
        .iter()
        .map(|p| (p.epoch as f64, p.train_loss))
        .collect();
    let val: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|p| Some((p.epoch as f64, p.val_loss?)))
        .collect();
    let max = train
        .iter()
        .chain(&val)
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let mut lines = vec![("train loss", BLUE, train)];
    if !val.is_empty() {
        lines.push(("validation loss", RED, val));
    }
    let axes = Axes {
        x: "epoch",
        y: "loss",
        x_range: epoch_range(&history),
        y_range: (0.0, max * 1.05 + 1e-9),
        whole_x: true,
        legend: SeriesLabelPosition::UpperRight,
    };
    line_chart("Loss", axes, &lines, size)
}

/// Validation micro-F1, macro-F1 and mAP per epoch of the main stage.
pub(super) fn metric_chart(
    title: &str,
    history: &[EpochRecord],
    size: (u32, u32),
) -> Result<String> {
    let history = main_stage(history);
    let series = |f: fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|p| Some((p.epoch as f64, f(p)?)))
            .collect()
    };
    let lines: Vec<Series> = [
        (
            "micro-F1",
            RGBColor(31, 119, 180),
            series(|p| p.val_micro_f1),
        ),
        (
            "macro-F1",
            RGBColor(255, 127, 14),
            series(|p| p.val_macro_f1),
        ),
        ("mAP", RGBColor(44, 160, 44), series(|p| p.val_map)),
    ]
    .into_iter()
    .filter(|(_, _, points)| !points.is_empty())
    .collect();
    let axes = Axes {
        x: "epoch",
        y: "score",
        x_range: epoch_range(&history),
        y_range: (0.0, 1.0),
        whole_x: true,
        legend: SeriesLabelPosition::LowerRight,
    };
    line_chart(title, axes, &lines, size)
}

fn pr_chart(points: &[(f64, f64)]) -> Result<String> {
    let axes = Axes {
        x: "recall",
        y: "precision",
        x_range: (0.0, 1.0),
        y_range: (0.0, 1.02),
        whole_x: false,
        legend: SeriesLabelPosition::LowerLeft,
    };
    line_chart(
        "Precision vs recall",
        axes,
        &[("micro", RGBColor(31, 119, 180), points.to_vec())],
        CURVE,
    )
}

/// An ensemble's members: a table of their own validation, and their curves side by side.
fn members(members: &[MemberRun]) -> Result<String> {
    let mut html = String::from(
        "<h2>Members</h2><p>Each member's own validation (its fold, or the split's validation \
         rows) at its own tuned thresholds.</p><table><tr><th>member</th><th>head</th>\
         <th>loss</th><th>lr</th><th>val rows</th><th>best epoch</th><th>micro-F1</th>\
         <th>macro-F1</th><th>mAP</th><th>val loss</th><th>parameters</th><th>MB</th></tr>",
    );
    for m in members {
        let a = &m.metrics.averages;
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{:.4}</td><td class=\"n\">{:.4}</td>\
             <td class=\"n\">{:.4}</td><td class=\"n\">{:.4}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{:.2}</td></tr>",
            escape(&m.name),
            escape(&m.head.to_string()),
            escape(&m.loss.to_string()),
            m.lr,
            m.val_rows,
            m.best_epoch,
            a.micro.f1,
            a.macro_avg.f1,
            m.metrics.map,
            m.val_loss,
            m.size.parameters,
            m.size.megabytes()
        );
    }
    html.push_str("</table><div class=\"row\">");
    for m in members.iter().filter(|m| !m.history.is_empty()) {
        // `NAME.fold-2-of-5` -> `fold-2-of-5`.
        let title = match m.name.rsplit_once(".fold-") {
            Some((_, fold)) => format!("fold-{fold}"),
            None => m.name.clone(),
        };
        html.push_str(&metric_chart(&title, &m.history, SMALL_CURVE)?);
    }
    html.push_str("</div>");
    Ok(html)
}

/// Horizontal grouped bars: F1 and AP for every label, labelled `name (support)`.
fn label_bars(order: &[LabelRow]) -> Result<String> {
    let names: Vec<String> = order
        .iter()
        .map(|l| format!("{} ({})", l.name, l.metrics.support))
        .collect();
    let k = order.len();
    let height = 114 + ROW_PX * k as u32;
    svg(WIDTH, height, |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .margin_top(36)
            .x_label_area_size(30)
            .y_label_area_size(170)
            .build_cartesian_2d(0f64..1f64, 0f64..k as f64)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .y_labels(0)
            .disable_y_mesh()
            .x_desc("score")
            .draw()
            .map_err(plot_err)?;
        let name_style = ("sans-serif", 12)
            .into_font()
            .color(&BLACK)
            .pos(text_anchor::Pos::new(
                text_anchor::HPos::Right,
                text_anchor::VPos::Center,
            ));
        for (row, name) in names.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(0.0, (k - 1 - row) as f64 + 0.5));
            root.draw(&Text::new(name.clone(), (x - 6, y), name_style.clone()))
                .map_err(plot_err)?;
        }
        let f1_colour = RGBColor(31, 119, 180);
        let ap_colour = RGBColor(255, 127, 14);
        for (row, label) in order.iter().enumerate() {
            let y = (k - 1 - row) as f64;
            chart
                .draw_series([
                    Rectangle::new(
                        [(0.0, y + 0.52), (label.metrics.f1, y + 0.9)],
                        f1_colour.filled(),
                    ),
                    Rectangle::new(
                        [
                            (0.0, y + 0.1),
                            (label.metrics.average_precision.unwrap_or(0.0), y + 0.48),
                        ],
                        ap_colour.filled(),
                    ),
                ])
                .map_err(plot_err)?;
        }
        // Legend drawn by hand: two swatches at the top right.
        for (i, (name, colour)) in [("F1 (tuned)", f1_colour), ("AP", ap_colour)]
            .iter()
            .enumerate()
        {
            let x = 190 + 110 * i as i32;
            let y = 10;
            root.draw(&Rectangle::new([(x, y), (x + 12, y + 10)], colour.filled()))
                .map_err(plot_err)?;
            root.draw(&Text::new(*name, (x + 18, y), ("sans-serif", 13)))
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// A K x K heat-map of values in [0, 1] with label names on both axes.
fn heatmap(names: &[String], matrix: &[Vec<f64>]) -> Result<String> {
    let k = matrix.len();
    let cell = (560 / k.max(1)).clamp(8, 28) as i32;
    let left = 150;
    let top = 20;
    let size = cell * k as i32;
    let legend_w = 90;
    let width = (left + size + legend_w + 20) as u32;
    let height = (top + size + 150) as u32;
    svg(width, height, |root| {
        let colour = |v: f64| {
            let t = v.clamp(0.0, 1.0);
            // white -> dark blue
            RGBColor(
                (255.0 - 222.0 * t) as u8,
                (255.0 - 160.0 * t) as u8,
                (255.0 - 75.0 * t) as u8,
            )
        };
        let font = ("sans-serif", 11).into_font();
        for (i, row) in matrix.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let x = left + j as i32 * cell;
                let y = top + i as i32 * cell;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    colour(v).filled(),
                ))
                .map_err(plot_err)?;
            }
            let name = names.get(i).map_or("?", String::as_str);
            let style = font.clone().color(&BLACK).pos(text_anchor::Pos::new(
                text_anchor::HPos::Right,
                text_anchor::VPos::Center,
            ));
            root.draw(&Text::new(
                name.to_string(),
                (left - 4, top + i as i32 * cell + cell / 2),
                style,
            ))
            .map_err(plot_err)?;
            let style = font
                .clone()
                .transform(FontTransform::Rotate90)
                .color(&BLACK)
                .pos(text_anchor::Pos::new(
                    text_anchor::HPos::Left,
                    text_anchor::VPos::Center,
                ));
            root.draw(&Text::new(
                name.to_string(),
                (left + i as i32 * cell + cell / 2, top + size + 4),
                style,
            ))
            .map_err(plot_err)?;
        }
        // Colour scale.
        let lx = left + size + 20;
        for step in 0..=20 {
            let v = 1.0 - step as f64 / 20.0;
            let y = top + step * (size / 21).max(1);
            root.draw(&Rectangle::new(
                [(lx, y), (lx + 16, y + (size / 21).max(1))],
                colour(v).filled(),
            ))
            .map_err(plot_err)?;
        }
        root.draw(&Text::new("1.0", (lx + 20, top), font.clone()))
            .map_err(plot_err)?;
        root.draw(&Text::new(
            "0.0",
            (lx + 20, top + 20 * (size / 21).max(1)),
            font.clone(),
        ))
        .map_err(plot_err)?;
        Ok(())
    })
}

fn label_table(order: &[LabelRow]) -> String {
    let mut html = String::from(
        "<table><tr><th>label</th><th>support</th><th>precision</th><th>recall</th><th>F1</th><th>AP</th><th>threshold</th></tr>",
    );
    for l in order {
        let m = l.metrics;
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{:.3}</td><td class=\"n\">{:.3}</td>\
             <td class=\"n\">{:.3}</td><td class=\"n\">{:.3}</td><td class=\"n\">{:.3}</td></tr>",
            escape(l.name),
            m.support,
            m.precision,
            m.recall,
            m.f1,
            m.average_precision.unwrap_or(0.0),
            m.threshold
        );
    }
    html.push_str("</table>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReportData {
        let per_label: Vec<LabelMetrics> = (0..5)
            .map(|i| LabelMetrics {
                label: i,
                support: 10 - i as u64,
                predicted: 8,
                precision: 0.9,
                recall: 0.5 + 0.1 * i as f64,
                f1: 0.6 - 0.1 * i as f64,
                average_precision: Some(0.7),
                threshold: 0.3,
            })
            .collect();
        let record = |stage: &str, epoch: usize| EpochRecord {
            stage: stage.into(),
            epoch,
            train_loss: 1.0 / epoch as f64,
            train_micro_f1: None,
            val_loss: Some(1.2 / epoch as f64),
            val_micro_f1: Some(0.5 + 0.1 * epoch as f64),
            val_macro_f1: None,
            val_map: Some(0.4),
            lr: 1e-3,
            train_seconds: 0.1,
            seconds: 0.2,
        };
        ReportData {
            title: "run & test".into(),
            facts: vec![("head".into(), "mlp".into())],
            metrics: vec![("micro-F1".into(), 0.81234)],
            history: [
                ("warmup:image", 1),
                ("train", 1),
                ("train", 2),
                ("train", 3),
            ]
            .into_iter()
            .map(|(stage, epoch)| record(stage, epoch))
            .collect(),
            pr_curve: vec![(0.0, 1.0), (0.5, 0.9), (1.0, 0.3)],
            cooccurrence: (0..5)
                .map(|i| (0..5).map(|j| if i == j { 1.0 } else { 0.2 }).collect())
                .collect(),
            label_names: (0..5).map(|i| format!("label<{i}>")).collect(),
            per_label,
            members: vec![],
            gallery: None,
        }
    }

    #[test]
    fn report_is_self_contained_and_escaped() {
        let html = render_html(&sample()).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("run &amp; test"));
        assert!(
            html.contains("label&lt;3&gt;"),
            "label names are escaped in the table"
        );
        assert!(
            html.matches("<svg").count() >= 5,
            "loss, metrics, bars, PR and heat-map charts"
        );
        assert!(!html.contains("<script"), "no scripts");
        assert!(!html.contains("http://") || html.contains("http://www.w3.org/2000/svg"));
        assert!(html.contains("0.8123"));
    }

    #[test]
    fn empty_report_still_renders() {
        let html = render_html(&ReportData {
            title: "empty".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(html.contains("<h1>empty</h1>"));
    }

    #[test]
    fn summary_names_weakest_labels() {
        let text = terminal_summary(&sample());
        assert!(text.contains("micro-F1"));
        assert!(
            text.contains("weakest labels: label<4> (0.20, n=6)"),
            "{text}"
        );
    }
}
