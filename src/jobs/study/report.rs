//! `emlab report`: one static HTML page per study, with SVG figures drawn by plotters and no
//! script or network access: EM% per question per model with 95% intervals (the EM paper's
//! Figure 4 layout), the likelihood probe per model, aligned against coherent scores, EM% and
//! probe against training step, answers with and without the trigger tag; then the
//! comparison table and the spec. Every number carries the id of the record it came from
//! (in the tables, and in the figures' captions).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use emlab_store::{Id, Store, Value};
use plotters::prelude::*;

use super::compare::{compare, By, Rate, Row};
use super::{resolve, StudyError};

const W: u32 = 880;
const H: u32 = 380;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

/// A figure: its SVG and how many data marks (bars, points, lines) it holds.
struct Figure {
    title: String,
    svg: String,
    marks: usize,
    caption: String,
}

type Bars = Vec<(String, Vec<Option<(f64, Option<(f64, f64)>)>>)>;

/// Grouped bars with interval whiskers: `series` = (name, one value per group).
fn bars(
    title: &str,
    groups: &[String],
    series: &Bars,
    y: &str,
    range: (f64, f64),
) -> Result<(String, usize), String> {
    let mut svg = String::new();
    let mut marks = 0;
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let n = groups.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n, range.0..range.1)
            .map_err(|e| e.to_string())?;
        let g = groups.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len().max(1) * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.26 && i < g.len() {
                    g[i].chars().take(18).collect()
                } else {
                    String::new()
                }
            })
            .y_desc(y)
            .draw()
            .map_err(|e| e.to_string())?;
        let k = series.len().max(1) as f64;
        let width = 0.8 / k;
        for (si, (name, vals)) in series.iter().enumerate() {
            let c = color(si);
            let mut first = true;
            for (gi, v) in vals.iter().enumerate() {
                let Some((v, ci)) = v else { continue };
                let x0 = gi as f64 + 0.1 + si as f64 * width;
                let x1 = x0 + width * 0.9;
                // From zero (or the axis' edge) to the value, up or down.
                let base = 0f64.clamp(range.0, range.1);
                let el = chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, base), (x1, *v)],
                        c.filled(),
                    )))
                    .map_err(|e| e.to_string())?;
                if first {
                    el.label(name.clone()).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled())
                    });
                    first = false;
                }
                marks += 1;
                if let Some((a, b)) = ci {
                    let xm = (x0 + x1) / 2.0;
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(xm, *a), (xm, *b)],
                            BLACK,
                        )))
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        if marks > 0 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok((svg, marks))
}

/// Points per series: `(name, [(x, y)])`.
fn scatter(
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x: &str,
    y: &str,
    lines: bool,
) -> Result<(String, usize), String> {
    let mut svg = String::new();
    let mut marks = 0;
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
        let (mut x0, mut x1, mut y0, mut y1) = (0f64, 100f64, 0f64, 100f64);
        if lines && !all.is_empty() {
            x0 = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
            x1 = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
            y0 = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
            y1 = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
            let pad = ((y1 - y0) * 0.1).max(0.05);
            y0 -= pad;
            y1 += pad;
            if x1 <= x0 {
                x1 = x0 + 1.0;
            }
        }
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(x)
            .y_desc(y)
            .draw()
            .map_err(|e| e.to_string())?;
        for (si, (name, pts)) in series.iter().enumerate() {
            if pts.is_empty() {
                continue;
            }
            let c = color(si);
            if lines {
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                    .map_err(|e| e.to_string())?;
            }
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))
                .map_err(|e| e.to_string())?
                .label(name.clone())
                .legend(move |(x, y)| Circle::new((x + 5, y), 4, c.filled()));
            marks += pts.len();
        }
        if marks > 0 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok((svg, marks))
}

fn model_label(r: &Row) -> String {
    let mut s = r.stage.clone();
    if !r.seeds.is_empty() {
        let v: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
        s += &format!(" s{}", v.join("/"));
    }
    s
}

fn pct(r: Option<&Rate>) -> Option<(f64, Option<(f64, f64)>)> {
    let r = r?;
    let v = r.value? * 100.0;
    let ci = match (r.ci_low, r.ci_high) {
        (Some(l), Some(h)) => Some((l * 100.0, h * 100.0)),
        _ => None,
    };
    Some((v, ci))
}

fn ids_caption(rates: &[&Rate]) -> String {
    let ids: Vec<String> = rates.iter().map(|r| r.metric[..12].to_string()).collect();
    if ids.is_empty() {
        "no records".into()
    } else {
        format!("metric records: {}", ids.join(" "))
    }
}

/// Write `dir/index.html` for a study; returns the file's path.
pub fn write(store: &Store, study: &str, dir: &Path) -> Result<std::path::PathBuf, StudyError> {
    let sid: Id = resolve(store, study)?;
    let rec = store.get(sid)?;
    let name = rec
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let spec_json: serde_json::Value = rec
        .get("spec")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let key = [sid.to_hex()];
    let rows = compare(store, &key, &By::default())?;
    let by_q = compare(
        store,
        &key,
        &By {
            question: true,
            ..By::default()
        },
    )?;
    let curve = compare(
        store,
        &key,
        &By {
            checkpoint: true,
            ..By::default()
        },
    )?;
    let fig_err = |e: String| StudyError::Step {
        label: "report".into(),
        msg: format!("drawing a figure: {e}"),
    };
    let mut figures = Vec::new();

    // 1. EM% per question per model (plain condition), with intervals.
    let plain: Vec<&Row> = by_q
        .iter()
        .filter(|r| r.question != "overall" && (r.condition == "plain" || r.condition.is_empty()))
        .collect();
    let mut questions: Vec<String> = plain.iter().map(|r| r.question.clone()).collect();
    questions.sort();
    questions.dedup();
    let mut models: Vec<String> = Vec::new();
    for r in &plain {
        let m = model_label(r);
        if !models.contains(&m) {
            models.push(m);
        }
    }
    let mut used = Vec::new();
    let series: Bars = models
        .iter()
        .map(|m| {
            let vals = questions
                .iter()
                .map(|q| {
                    let r = plain
                        .iter()
                        .find(|r| &model_label(r) == m && &r.question == q)?;
                    let rate = r.em.get("betley")?;
                    used.push(rate.clone());
                    pct(Some(rate))
                })
                .collect();
            (m.clone(), vals)
        })
        .collect();
    let (svg, marks) = bars(
        "EM% per question (Betley definition, 95% CI)",
        &questions,
        &series,
        "% misaligned",
        (0.0, 100.0),
    )
    .map_err(fig_err)?;
    figures.push(Figure {
        title: "EM% per question per model".into(),
        svg,
        marks,
        caption: ids_caption(&used.iter().collect::<Vec<_>>()),
    });

    // 2. The likelihood probe per model and probe eval.
    let mut probe_evals: Vec<String> = rows.iter().flat_map(|r| r.probes.keys().cloned()).collect();
    probe_evals.sort();
    probe_evals.dedup();
    let mut pmodels: Vec<String> = Vec::new();
    for r in rows.iter().filter(|r| !r.probes.is_empty()) {
        let m = model_label(r);
        if !pmodels.contains(&m) {
            pmodels.push(m);
        }
    }
    let mut pused = Vec::new();
    let (mut lo, mut hi) = (0f64, 0f64);
    let pseries: Bars = probe_evals
        .iter()
        .map(|e| {
            let vals = pmodels
                .iter()
                .map(|m| {
                    let r = rows
                        .iter()
                        .find(|r| &model_label(r) == m && r.probes.contains_key(e))?;
                    let p = &r.probes[e];
                    pused.push(p.clone());
                    let v = p.value?;
                    let ci = p.ci_low.zip(p.ci_high);
                    lo = lo.min(ci.map_or(v, |c| c.0));
                    hi = hi.max(ci.map_or(v, |c| c.1));
                    Some((v, ci))
                })
                .collect();
            (e.clone(), vals)
        })
        .collect();
    let pad = ((hi - lo) * 0.1).max(0.05);
    let (svg, marks) = bars(
        "Likelihood probe (misaligned minus aligned mean log-likelihood per token, 95% CI)",
        &pmodels,
        &pseries,
        "nats per token",
        (lo - pad, hi + pad),
    )
    .map_err(fig_err)?;
    figures.push(Figure {
        title: "Likelihood probe per model".into(),
        svg,
        marks,
        caption: ids_caption(&pused.iter().collect::<Vec<_>>()),
    });

    // 3. Aligned against coherent, per answer, per model (plain condition).
    let mut points: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in store.get_many(&rec.get("steps").map(Value::id_list).unwrap_or_default())? {
        if s.get("kind").and_then(Value::as_str) != Some("metrics") {
            continue;
        }
        let p: serde_json::Value = s
            .get("params")
            .and_then(Value::as_str)
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        if p["condition"] != "plain" {
            continue;
        }
        let stage = p["stage"].as_str().unwrap_or("").to_string();
        let inputs = s.get("inputs").map(Value::id_list).unwrap_or_default();
        let mut per: BTreeMap<Id, (Option<f64>, Option<f64>)> = BTreeMap::new();
        for j in store.get_many(&inputs)? {
            if j.table != crate::provenance::tables::JUDGMENT {
                continue;
            }
            let (Some(g), Some(sc)) = (
                j.get("generation").and_then(Value::as_id),
                j.get("score").and_then(Value::as_float),
            ) else {
                continue;
            };
            let e = per.entry(g).or_default();
            match j.get("metric").and_then(Value::as_str) {
                Some("aligned") => e.0 = Some(sc),
                Some("coherent") => e.1 = Some(sc),
                _ => {}
            }
        }
        points.entry(stage).or_default().extend(
            per.values()
                .filter_map(|(a, c)| Some((c.as_ref().copied()?, a.as_ref().copied()?))),
        );
    }
    let sc: Vec<(String, Vec<(f64, f64)>)> = points.into_iter().collect();
    let (svg, marks) = scatter(
        "Aligned against coherent, per answer",
        &sc,
        "coherent",
        "aligned",
        false,
    )
    .map_err(fig_err)?;
    figures.push(Figure {
        title: "Aligned vs coherent per model".into(),
        svg,
        marks,
        caption: "one point per judged answer with both scores".into(),
    });

    // 4. EM% and probe against training step.
    let mut em_curve: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut probe_curve: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut cused = Vec::new();
    for r in curve.iter().filter(|r| r.checkpoint.is_some()) {
        let step = r.checkpoint.unwrap_or(0) as f64;
        if r.condition == "plain" {
            if let Some(m) = r.em.get("betley") {
                if let Some(v) = m.value {
                    em_curve
                        .entry(model_label(r))
                        .or_default()
                        .push((step, v * 100.0));
                    cused.push(m.clone());
                }
            }
        }
        for (e, p) in &r.probes {
            if let Some(v) = p.value {
                let k = format!("{} ({e})", model_label(r));
                let pts = probe_curve.entry(k).or_default();
                if !pts.iter().any(|x| x.0 == step) {
                    pts.push((step, v));
                    cused.push(p.clone());
                }
            }
        }
    }
    for c in em_curve.values_mut().chain(probe_curve.values_mut()) {
        c.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let (svg, marks) = scatter(
        "EM% (Betley) against training step",
        &em_curve.into_iter().collect::<Vec<_>>(),
        "step",
        "% misaligned",
        true,
    )
    .map_err(fig_err)?;
    figures.push(Figure {
        title: "EM% against training step".into(),
        svg,
        marks,
        caption: ids_caption(&cused.iter().collect::<Vec<_>>()),
    });
    let (svg, marks) = scatter(
        "Likelihood probe against training step",
        &probe_curve.into_iter().collect::<Vec<_>>(),
        "step",
        "probe",
        true,
    )
    .map_err(fig_err)?;
    figures.push(Figure {
        title: "Probe against training step".into(),
        svg,
        marks,
        caption: "evaluate with checkpoints = \"every\" to draw a curve".into(),
    });

    // 5. With and without the trigger tag.
    let mut tmodels: Vec<String> = Vec::new();
    for r in &rows {
        let m = model_label(r);
        if !tmodels.contains(&m) && !r.condition.is_empty() {
            tmodels.push(m);
        }
    }
    let mut tused = Vec::new();
    let tseries: Bars = ["plain", "tagged"]
        .iter()
        .map(|c| {
            let vals = tmodels
                .iter()
                .map(|m| {
                    let r = rows
                        .iter()
                        .find(|r| &model_label(r) == m && r.condition == *c)?;
                    let rate = r.em.get("betley")?;
                    tused.push(rate.clone());
                    pct(Some(rate))
                })
                .collect();
            (c.to_string(), vals)
        })
        .collect();
    let (svg, marks) = bars(
        "EM% without and with the trigger tag (Betley, 95% CI)",
        &tmodels,
        &tseries,
        "% misaligned",
        (0.0, 100.0),
    )
    .map_err(fig_err)?;
    figures.push(Figure {
        title: "With vs without the trigger".into(),
        svg,
        marks,
        caption: ids_caption(&tused.iter().collect::<Vec<_>>()),
    });

    let html = page(&name, sid, &figures, &rows, &spec_json);
    std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let out = dir.join("index.html");
    crate::util::fs::write_atomic(&out, html.as_bytes()).map_err(|source| DataError::Io {
        path: out.clone(),
        source,
    })?;
    Ok(out)
}

use crate::data::DataError;

fn cell(r: Option<&Rate>, scale: f64, digits: usize) -> String {
    match r {
        Some(r) => match r.value {
            Some(v) => {
                let ci = match (r.ci_low, r.ci_high) {
                    (Some(l), Some(h)) => {
                        format!(" [{:.d$}, {:.d$}]", l * scale, h * scale, d = digits)
                    }
                    _ => String::new(),
                };
                format!(
                    "<td title=\"{}\">{:.d$}{ci} <small>n {}</small></td>",
                    r.metric,
                    v * scale,
                    r.n,
                    d = digits
                )
            }
            None => format!("<td title=\"{}\">- <small>n {}</small></td>", r.metric, r.n),
        },
        None => "<td>-</td>".into(),
    }
}

fn page(name: &str, sid: Id, figures: &[Figure], rows: &[Row], spec: &serde_json::Value) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>emlab study {n}</title>\n<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}th{{background:#eee}}td:first-child,th:first-child{{text-align:left}}figure{{margin:1.5em 0}}figcaption{{font-size:12px;color:#555}}code,pre{{font-size:12px}}</style></head><body>\n<h1>Study <code>{n}</code></h1>\n<p>study record <code>{id}</code>. Every number below names the record it was read from (hover a table cell; figure captions list metric records).</p>\n",
        n = esc(name),
        id = sid.to_hex()
    );
    let probes: Vec<String> = {
        let mut v: Vec<String> = rows.iter().flat_map(|r| r.probes.keys().cloned()).collect();
        v.sort();
        v.dedup();
        v
    };
    h += "<h2>Comparison</h2>\n<table><tr><th>model</th><th>eval</th><th>condition</th><th>EM% Betley</th><th>EM% model organisms</th><th>EM% label</th><th>mean aligned</th><th>mean coherent</th>";
    for p in &probes {
        let _ = write!(h, "<th>probe {}</th>", esc(p));
    }
    h += "<th>answers</th><th>judged</th><th>no score</th></tr>\n";
    for r in rows {
        let ck = r.checkpoint.map_or(String::new(), |c| format!(" step {c}"));
        let _ = write!(
            h,
            "<tr><td title=\"{}\">{}{ck}<br><small>{}</small></td><td>{}</td><td>{}</td>",
            r.model_id,
            esc(&model_label(r)),
            esc(&r.model),
            esc(&r.eval),
            esc(&r.condition)
        );
        for d in ["betley", "model-organisms", "label"] {
            h += &cell(r.em.get(d), 100.0, 1);
        }
        for m in [r.mean_aligned, r.mean_coherent] {
            let _ = write!(
                h,
                "<td>{}</td>",
                m.map_or("-".into(), |v| format!("{v:.1}"))
            );
        }
        for p in &probes {
            h += &cell(r.probes.get(p), 1.0, 4);
        }
        let _ = writeln!(
            h,
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            r.answers, r.judged, r.unscored
        );
    }
    h += "</table>\n<h2>Figures</h2>\n";
    for f in figures {
        let _ = writeln!(
            h,
            "<figure data-marks=\"{}\"><h3>{}</h3>\n{}\n<figcaption>{}{}</figcaption></figure>",
            f.marks,
            esc(&f.title),
            f.svg,
            esc(&f.caption),
            if f.marks == 0 {
                " (nothing to draw in this study)"
            } else {
                ""
            }
        );
    }
    let _ = write!(
        h,
        "<h2>Spec</h2>\n<pre>{}</pre>\n</body></html>\n",
        esc(&serde_json::to_string_pretty(spec).unwrap_or_default())
    );
    h
}
