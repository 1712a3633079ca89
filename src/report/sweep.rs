//! A sweep's ranked table, from its runs' validation numbers: markdown, csv, and one
//! self-contained HTML page (inline SVG, no scripts) with the table and every finished run's
//! validation curves side by side, drawn by the same charts as a run report.

use std::fmt::Write as _;

use anyhow::Result;

use super::html::{SMALL_CURVE, loss_chart, metric_chart};
use super::{RunMetrics, escape};

/// One configuration of a sweep: its grid values and, once finished, its validation numbers.
pub struct SweepRow<'a> {
    /// 1-based rank among the finished runs.
    pub rank: Option<usize>,
    pub name: &'a str,
    pub values: &'a [String],
    pub run: Option<&'a RunMetrics>,
    /// `finished`, `pending` or `failed`.
    pub status: &'a str,
}

/// A sweep's table: the grid's keys, what ranks it and its rows, ranked first.
pub struct SweepTable<'a> {
    pub title: String,
    pub keys: &'a [String],
    pub rank_by: String,
    pub rows: Vec<SweepRow<'a>>,
}

const COLUMNS: [&str; 9] = [
    "val micro-F1",
    "val macro-F1",
    "val mAP",
    "val loss",
    "rows",
    "epochs",
    "parameters",
    "MB",
    "s",
];

/// The numeric columns of a finished run ([`COLUMNS`]).
fn numbers(run: &RunMetrics) -> [String; 9] {
    let a = &run.metrics.averages;
    let epochs = run.history.iter().filter(|e| e.stage == "train").count();
    [
        format!("{:.4}", a.micro.f1),
        format!("{:.4}", a.macro_avg.f1),
        format!("{:.4}", run.metrics.map),
        format!("{:.4}", run.loss),
        format!("{} {}", run.rows, run.part),
        epochs.to_string(),
        run.size.parameters.to_string(),
        format!("{:.2}", run.size.megabytes()),
        format!("{:.0}", run.seconds()),
    ]
}

/// rank (or status), run, the grid values, the numbers.
fn cells(row: &SweepRow) -> Vec<String> {
    let mut cells = vec![
        row.rank.map_or(row.status.to_string(), |r| r.to_string()),
        row.name.to_string(),
    ];
    cells.extend(row.values.iter().cloned());
    match row.run {
        Some(run) => cells.extend(numbers(run)),
        None => cells.extend(COLUMNS.iter().map(|_| String::new())),
    }
    cells
}

fn header(table: &SweepTable) -> Vec<String> {
    let mut header = vec!["rank".to_string(), "run".to_string()];
    header.extend(table.keys.iter().cloned());
    header.extend(COLUMNS.iter().map(|c| c.to_string()));
    header
}

/// The table in markdown (grid values in code spans).
pub fn markdown(table: &SweepTable) -> String {
    let header = header(table);
    let mut out = format!(
        "{}\n\nRanked by validation {} (test rows never rank).\n\n| {} |\n|{}|\n",
        table.title,
        table.rank_by,
        header.join(" | "),
        vec!["---"; header.len()].join("|")
    );
    let keys = table.keys.len();
    for row in &table.rows {
        let cells: Vec<String> = cells(row)
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if (1..=keys + 1).contains(&i) {
                    format!("`{}`", c.replace('|', "\\|"))
                } else {
                    c
                }
            })
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// The table as csv (RFC 4180 quoting).
pub fn csv(table: &SweepTable) -> String {
    let quote = |c: &str| {
        if c.contains([',', '"', '\n']) {
            format!("\"{}\"", c.replace('"', "\"\""))
        } else {
            c.to_string()
        }
    };
    let line = |cells: Vec<String>| cells.iter().map(|c| quote(c)).collect::<Vec<_>>().join(",");
    let mut out = line(header(table)) + "\n";
    for row in &table.rows {
        out.push_str(&line(cells(row)));
        out.push('\n');
    }
    out
}

/// The table and every finished run's curves on one self-contained page.
pub fn html(table: &SweepTable) -> Result<String> {
    let title = escape(&table.title);
    let mut html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>{STYLE}</style></head><body><h1>{title}</h1><p>Ranked by validation {} (test \
         rows never rank).</p><table><tr>",
        escape(&table.rank_by)
    );
    for h in header(table) {
        let _ = write!(html, "<th>{}</th>", escape(&h));
    }
    html.push_str("</tr>");
    for row in &table.rows {
        html.push_str("<tr>");
        for c in cells(row) {
            let _ = write!(html, "<td>{}</td>", escape(&c));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table><h2>Validation curves</h2><div class=\"row\">");
    for row in &table.rows {
        let (Some(rank), Some(run)) = (row.rank, row.run) else {
            continue;
        };
        let label = format!("#{rank} {}", row.values.join(" "));
        let histories: Vec<(String, &[crate::train::history::EpochRecord])> =
            if run.members.is_empty() {
                vec![(label, &run.history)]
            } else {
                run.members
                    .iter()
                    .map(|m| (format!("{label} ({})", m.name), m.history.as_slice()))
                    .collect()
            };
        for (title, history) in histories.into_iter().filter(|(_, h)| !h.is_empty()) {
            let _ = write!(
                html,
                "<div class=\"run\">{}{}</div>",
                metric_chart(&title, history, SMALL_CURVE)?,
                loss_chart(history, SMALL_CURVE)?
            );
        }
    }
    html.push_str("</div></body></html>\n");
    Ok(html)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1800px;margin:24px auto;padding:0 16px;color:#222}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px}.row{display:flex;gap:16px;flex-wrap:wrap}\
.run{display:flex;flex-direction:column;border:1px solid #eee}\
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;text-align:left;border-bottom:1px solid #eee}";
