//! The lab's plots as small, self-contained SVG files (no fonts or libraries needed to view
//! them): energy by governor for a scenario, and every core's frequency over time in a run.

use std::fmt::Write as _;

use super::platform::Trace;

/// Points per core kept in a frequency plot: the trace is averaged over buckets of slices.
const MAX_POINTS: usize = 600;

const COLOURS: [&str; 8] =
    ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"];

/// An SVG document's opening: the element, a white background and the title at `left`.
fn open(width: f64, height: f64, font_size: u32, left: f64, title: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="{font_size}">"##
    );
    let _ = write!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = write!(
        s,
        r##"<text x="{left}" y="20" font-size="14" font-weight="bold">{}</text>"##,
        escape(title)
    );
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One bar group of the energy chart.
#[derive(Debug, Clone)]
pub(crate) struct EnergyBar {
    /// Row label.
    pub label: String,
    /// Package energy over `performance`'s.
    pub package: f64,
    /// Core energy over `performance`'s.
    pub core: f64,
    /// Every VM met its threshold.
    pub met: bool,
    /// Colour index.
    pub colour: usize,
}

/// Horizontal bars: package (solid) and core-only (light) energy against `performance`, with a
/// line at 1 and a mark on runs where a VM missed its threshold.
pub(crate) fn energy_chart(title: &str, bars: &[EnergyBar]) -> String {
    let (left, right, top, row) = (190.0, 130.0, 58.0, 30.0);
    let width = 820.0;
    let plot_w = width - left - right;
    #[allow(clippy::cast_precision_loss, reason = "a handful of rows")]
    let height = top + row * bars.len() as f64 + 40.0;
    let max = bars
        .iter()
        .flat_map(|b| [b.package, b.core])
        .filter(|v| v.is_finite())
        .fold(1.0_f64, f64::max);
    let x_max = ((max * 1.05) * 10.0).ceil() / 10.0;
    let x = |v: f64| left + plot_w * (v.max(0.0) / x_max).min(1.0);
    let mut s = open(width, height, 12, left, title);
    let _ = write!(
        s,
        r##"<text x="{left}" y="38" fill="#555">energy relative to performance: package (dark), cores only (light); ✗ a VM missed its threshold</text>"##
    );
    // Grid every 0.1 (0.2 past 2).
    let step = if x_max > 2.0 { 0.2 } else { 0.1 };
    let mut v = 0.0;
    while v <= x_max + 1e-9 {
        let gx = x(v);
        let colour = if (v - 1.0).abs() < 1e-9 { "#333" } else { "#ddd" };
        let _ = write!(
            s,
            r##"<line x1="{gx:.1}" y1="{top}" x2="{gx:.1}" y2="{:.1}" stroke="{colour}"/>"##,
            height - 34.0
        );
        let _ = write!(
            s,
            r##"<text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{v:.1}</text>"##,
            height - 20.0
        );
        v += step;
    }
    for (i, b) in bars.iter().enumerate() {
        #[allow(clippy::cast_precision_loss, reason = "a handful of rows")]
        let y = top + row * i as f64;
        let colour = COLOURS[b.colour % COLOURS.len()];
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 8.0,
            y + 15.0,
            escape(&b.label)
        );
        if b.package.is_finite() {
            let _ = write!(
                s,
                r##"<rect x="{left}" y="{:.1}" width="{:.1}" height="12" fill="{colour}"/>"##,
                y + 4.0,
                x(b.package) - left
            );
        }
        if b.core.is_finite() {
            let _ = write!(
                s,
                r##"<rect x="{left}" y="{:.1}" width="{:.1}" height="8" fill="{colour}" fill-opacity="0.4"/>"##,
                y + 17.0,
                x(b.core) - left
            );
        }
        let mark =
            if b.met { String::new() } else { r##" <tspan fill="#c00">✗</tspan>"##.into() };
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}">{:.3} ({:.3}){mark}</text>"##,
            x(b.package.max(b.core)) + 6.0,
            y + 15.0,
            b.package,
            b.core
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Means of `values` over consecutive buckets of `n`.
fn bucket_means(values: impl Iterator<Item = f32>, n: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let (mut sum, mut count) = (0.0_f64, 0_usize);
    for v in values {
        sum += f64::from(v);
        count += 1;
        if count == n {
            #[allow(clippy::cast_precision_loss, reason = "small counts")]
            out.push(sum / count as f64);
            (sum, count) = (0.0, 0);
        }
    }
    if count > 0 {
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        out.push(sum / count as f64);
    }
    out
}

/// One lane per core: its mean frequency over time (averaged over buckets of slices so the file
/// stays small), with the class's P-states as grid lines.
pub(crate) fn frequency_chart(title: &str, trace: &Trace, pstates_ghz: &[f64]) -> String {
    let (left, right, top, lane, gap) = (70.0, 20.0, 50.0, 70.0, 14.0);
    let width = 900.0;
    let plot_w = width - left - right;
    let cores = trace.cores.max(1);
    #[allow(clippy::cast_precision_loss, reason = "a few cores")]
    let height = top + (lane + gap) * cores as f64 + 30.0;
    let slices = trace.slices();
    let per_bucket = slices.div_ceil(MAX_POINTS).max(1);
    #[allow(clippy::cast_precision_loss, reason = "slice counts are far below 2^53")]
    let duration = slices as f64 * trace.timeslice_s;
    let lo = pstates_ghz.iter().copied().fold(f64::INFINITY, f64::min);
    let lo = if lo.is_finite() { (lo * 0.9 * 10.0).floor() / 10.0 } else { 0.0 };
    let hi = pstates_ghz.iter().copied().fold(0.0_f64, f64::max).max(lo + 0.1);
    let mut s = open(width, height, 11, left, title);
    let _ = write!(
        s,
        r##"<text x="{left}" y="37" fill="#555">mean frequency of each core per {:.0} ms (GHz); {slices} slices of {:.0} ms, {duration:.1} s simulated</text>"##,
        1e3 * trace.timeslice_s * f64::from(u32::try_from(per_bucket).unwrap_or(u32::MAX)),
        1e3 * trace.timeslice_s
    );
    for core in 0..cores {
        #[allow(clippy::cast_precision_loss, reason = "a few cores")]
        let y0 = top + (lane + gap) * core as f64;
        let y = |ghz: f64| y0 + lane - lane * ((ghz - lo) / (hi - lo)).clamp(0.0, 1.0);
        let _ = write!(
            s,
            r##"<rect x="{left}" y="{y0:.1}" width="{plot_w}" height="{lane}" fill="none" stroke="#ccc"/>"##
        );
        for &p in pstates_ghz {
            let _ = write!(
                s,
                r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
                y(p),
                left + plot_w,
                y(p)
            );
        }
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">core {core}</text><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#777">{hi:.1}</text><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#777">{lo:.1}</text>"##,
            left - 6.0,
            y0 + lane / 2.0 + 4.0,
            left - 6.0,
            y(hi) + 10.0,
            left - 6.0,
            y0 + lane
        );
        let means = bucket_means(
            trace.ghz.iter().skip(core).step_by(trace.cores.max(1)).copied(),
            per_bucket,
        );
        let n = means.len().max(2) - 1;
        let mut points = String::new();
        for (i, g) in means.iter().enumerate() {
            #[allow(clippy::cast_precision_loss, reason = "at most a few hundred points")]
            let px = left + plot_w * i as f64 / n as f64;
            let _ = write!(points, "{px:.1},{:.1} ", y(*g));
        }
        let _ = write!(
            s,
            r##"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.2"/>"##,
            points.trim_end(),
            COLOURS[core % COLOURS.len()]
        );
    }
    let axis_y = height - 16.0;
    for k in 0..=5 {
        let t = duration * f64::from(k) / 5.0;
        let px = left + plot_w * f64::from(k) / 5.0;
        let _ = write!(
            s,
            r##"<text x="{px:.1}" y="{axis_y:.1}" text-anchor="middle" fill="#555">{t:.1} s</text>"##
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_small_well_formed_svg() {
        let trace = Trace {
            cores: 2,
            timeslice_s: 0.01,
            ghz: (0..20_000).map(|i| if i % 4 < 2 { 1.4 } else { 2.2 }).collect(),
        };
        let f = frequency_chart("a & b", &trace, &[1.4, 1.8, 2.2]);
        assert!(f.starts_with("<svg") && f.ends_with("</svg>\n"));
        assert!(f.contains("a &amp; b"));
        assert!(f.len() < 60_000, "{} bytes", f.len());
        assert_eq!(f.matches("<polyline").count(), 2);
        let e = energy_chart(
            "x",
            &[
                EnergyBar {
                    label: "performance".into(),
                    package: 1.0,
                    core: 1.0,
                    met: true,
                    colour: 0,
                },
                EnergyBar { label: "vmgov".into(), package: 0.9, core: 0.8, met: false, colour: 1 },
            ],
        );
        assert!(e.contains("✗") && e.contains("0.900"));
    }

    #[test]
    fn buckets_average_and_keep_the_tail() {
        assert_eq!(bucket_means([1.0_f32, 3.0, 5.0].into_iter(), 2), vec![2.0, 5.0]);
    }
}
