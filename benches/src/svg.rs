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
}
