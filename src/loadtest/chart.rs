//! The report's timeline as a self-contained SVG line chart: target rate
//! (dashed), achieved rate, and one line per replica, over time.

use std::fmt::Write as _;

use super::report::Report;

const W: f64 = 900.0;
const H: f64 = 440.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 48.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One line: label, color, dashed, points (seconds, rate).
type Series = (String, String, bool, Vec<(f64, f64)>);

/// A round axis maximum at or above `v` (1, 2 or 5 times a power of ten).
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The plot area and its scales.
struct Frame {
    t_max: f64,
    y_max: f64,
    pw: f64,
    ph: f64,
}

impl Frame {
    fn x(&self, t: f64) -> f64 {
        LEFT + t / self.t_max * self.pw
    }

    fn y(&self, v: f64) -> f64 {
        TOP + self.ph - v / self.y_max * self.ph
    }
}

/// Renders the chart.
pub fn svg(report: &Report) -> String {
    let t_max = report.timeline.last().map_or(1.0, |p| p.t).max(1.0);
    let y_top = report
        .timeline
        .iter()
        .map(|p| p.target_rate.max(p.achieved_rate))
        .fold(0.0, f64::max);
    let frame = Frame {
        t_max,
        y_max: nice_max(y_top * 1.05),
        pw: W - LEFT - RIGHT,
        ph: H - TOP - BOTTOM,
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{} load test: target and achieved per second, per replica</text>"#,
        escape(&report.kind.to_uppercase())
    );
    axes(&mut out, &frame);
    draw(&mut out, &frame, &series(report));
    out.push_str("</svg>\n");
    out
}

/// The grid, the axes' labels and the frame.
fn axes(out: &mut String, f: &Frame) {
    let Frame {
        t_max,
        y_max,
        pw,
        ph,
    } = *f;
    // grid and y labels
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        let yy = f.y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            if y_max < 10.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            }
        );
    }
    let x_step = [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|s| t_max / s <= 10.0)
        .unwrap_or((t_max / 10.0).ceil());
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let xx = f.x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{t:.0}</text>"##,
            TOP + ph,
            TOP + ph + 16.0
        );
        t += x_step;
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds</text><text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">per second</text>"##,
        LEFT + pw / 2.0,
        H - 10.0,
        TOP + ph / 2.0
    );
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#999"/>"##
    );
}

/// The target, the achieved rate and each replica's, as lines.
fn series(report: &Report) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    let mut target = Vec::new();
    for p in &report.timeline {
        target.push((p.t - 1.0, p.target_rate));
        target.push((p.t, p.target_rate));
    }
    series.push(("target".into(), "#888888".into(), true, target));
    // rates are drawn at the middle of the second they cover
    series.push((
        "achieved".into(),
        "#000000".into(),
        false,
        report
            .timeline
            .iter()
            .map(|p| (p.t - 0.5, p.achieved_rate))
            .collect(),
    ));
    for (i, name) in report.replica_names().iter().enumerate() {
        let pts = report
            .timeline
            .iter()
            .map(|p| (p.t - 0.5, p.replicas.get(name).copied().unwrap_or(0.0)))
            .collect();
        series.push((
            format!("replica {name}"),
            COLORS[i % COLORS.len()].to_string(),
            false,
            pts,
        ));
    }
    series
}

/// Each series' line and its legend.
fn draw(out: &mut String, f: &Frame, series: &[Series]) {
    let pw = f.pw;
    for (i, (label, color, dashed, pts)) in series.iter().enumerate() {
        let path: Vec<String> = pts
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", f.x(t), f.y(v)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="{}"{} points="{}"/>"#,
            if *dashed { 1.5 } else { 2.0 },
            if *dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            },
            path.join(" ")
        );
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 14.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            if *dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            },
            lx + 30.0,
            ly + 4.0,
            escape(label)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_max_rounds_up() {
        assert_eq!(nice_max(7.0), 8.0);
        assert_eq!(nice_max(9.0), 10.0);
        assert_eq!(nice_max(11.0), 15.0);
        assert_eq!(nice_max(26.0), 30.0);
        assert!((nice_max(0.35) - 0.4).abs() < 1e-9);
        assert_eq!(nice_max(0.0), 1.0);
    }
}
