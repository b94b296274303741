//! Latency distributions as small SVG plots, written by hand: x is the
//! percentile on a "nines" scale (50, 90, 99, 99.9, 99.99), y the latency
//! in milliseconds on a log scale, one line per system.

use hdrhistogram::Histogram;

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Quantiles plotted, as (quantile, label).
const QUANTILES: [(f64, &str); 7] = [(0.5, "50"), (0.75, "75"), (0.9, "90"), (0.99, "99"), (0.999, "99.9"), (0.9999, "99.99"), (0.99999, "99.999")];

fn nines(q: f64) -> f64 {
    -(1.0 - q).log10()
}

/// An SVG of the latency percentiles of each series (microsecond histograms).
pub fn percentiles(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let points: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, h)| QUANTILES.iter().map(|(q, _)| (nines(*q), (h.value_at_quantile(*q).max(1) as f64 / 1e3).log10())).collect())
        .collect();
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for p in points.iter().flatten() {
        lo = lo.min(p.1);
        hi = hi.max(p.1);
    }
    if lo > hi {
        (lo, hi) = (0.0, 1.0);
    }
    let (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor() + 1.0));
    let x_max = nines(QUANTILES[QUANTILES.len() - 1].0);
    let x = |v: f64| LEFT + (v - nines(0.5)) / (x_max - nines(0.5)) * (W - LEFT - RIGHT);
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * (H - TOP - BOTTOM);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s += &format!("<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" font-size=\"14\">{}</text>\n", LEFT, escape(title));
    let mut d = lo;
    while d <= hi + 1e-9 {
        let yy = y(d);
        s += &format!("<line x1=\"{LEFT}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\n", W - RIGHT);
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n", LEFT - 6.0, yy + 4.0, fmt_ms(10f64.powf(d)));
        d += 1.0;
    }
    for (q, label) in QUANTILES {
        let xx = x(nines(q));
        s += &format!("<line x1=\"{xx:.1}\" y1=\"{TOP}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n", H - BOTTOM);
        s += &format!("<text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n", H - BOTTOM + 16.0);
    }
    s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>\n", (LEFT + W - RIGHT) / 2.0, H - 12.0);
    s += &format!("<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">ack latency, ms (log)</text>\n", H / 2.0, H / 2.0);
    for (i, ((name, _), pts)) in series.iter().zip(&points).enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b))).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n", path.join(" "));
        let ly = TOP + 10.0 + 18.0 * i as f64;
        s += &format!("<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"2\"/>\n", W - RIGHT + 10.0, W - RIGHT + 30.0);
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n", W - RIGHT + 36.0, ly + 4.0, escape(name));
    }
    s += "</svg>\n";
    s
}

/// An SVG of y against x for each series, x on a log scale (for cost
/// growth: history 1x, 10x, 100x), y linear from zero.
pub fn growth(title: &str, x_label: &str, y_label: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| x.max(1e-9).log10()));
    let (x_lo, x_hi) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (x_lo, x_hi) = if x_lo > x_hi { (0.0, 1.0) } else { (x_lo.floor(), x_hi.ceil().max(x_lo.floor() + 1.0)) };
    let y_max = series.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)).fold(0.0f64, f64::max);
    let step = nice_step(y_max.max(1e-9) / 5.0);
    let y_hi = (y_max / step).ceil().max(1.0) * step;
    let x = |v: f64| LEFT + (v.max(1e-9).log10() - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT);
    let y = |v: f64| TOP + (y_hi - v) / y_hi * (H - TOP - BOTTOM);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s += &format!("<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" font-size=\"14\">{}</text>\n", LEFT, escape(title));
    let mut v = 0.0;
    while v <= y_hi + step / 2.0 {
        let yy = y(v);
        s += &format!("<line x1=\"{LEFT}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\n", W - RIGHT);
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n", LEFT - 6.0, yy + 4.0, fmt_ms(v));
        v += step;
    }
    let mut d = x_lo;
    while d <= x_hi + 1e-9 {
        let xx = x(10f64.powf(d));
        s += &format!("<line x1=\"{xx:.1}\" y1=\"{TOP}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n", H - BOTTOM);
        s += &format!("<text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}x</text>\n", H - BOTTOM + 16.0, fmt_ms(10f64.powf(d)));
        d += 1.0;
    }
    s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n", (LEFT + W - RIGHT) / 2.0, H - 12.0, escape(x_label));
    s += &format!("<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">{}</text>\n", H / 2.0, H / 2.0, escape(y_label));
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b))).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n", path.join(" "));
        for (a, b) in pts {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n", x(*a), y(*b));
        }
        let ly = TOP + 10.0 + 18.0 * i as f64;
        s += &format!("<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"2\"/>\n", W - RIGHT + 10.0, W - RIGHT + 30.0);
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n", W - RIGHT + 36.0, ly + 4.0, escape(name));
    }
    s += "</svg>\n";
    s
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|s| *s >= raw).unwrap_or(10.0 * p)
}

fn fmt_ms(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_plot_has_one_line_per_series() {
        let mut a = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        let mut b = a.clone();
        for v in 1..1000u64 {
            a.record(v * 10).unwrap();
            b.record(v * 100).unwrap();
        }
        let svg = super::percentiles("x < y & z", &[("a", &a), ("b", &b)]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("x &lt; y &amp; z") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn a_growth_plot_has_a_point_per_measurement() {
        let svg = super::growth("t", "history", "MB/s", &[("ingest", vec![(1.0, 80.0), (10.0, 78.0), (100.0, 60.0)])]);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains(">100x<") && svg.contains(">80<"));
    }
}
