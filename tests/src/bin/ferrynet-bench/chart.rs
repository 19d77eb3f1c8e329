//! A small SVG line chart, written by the benchmark itself: one line per series over a few
//! x positions, on a 0-based y axis, with a legend and reference lines.
use std::fmt::Write as _;

pub struct Series<'a> {
    pub label: &'a str,
    pub color: &'a str,
    /// One value per x label; `None` leaves a gap.
    pub values: Vec<Option<f64>>,
    /// Drawn dashed: a second line of the same color, for a variant of a series.
    pub dashed: bool,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_title: &'a str,
    pub y_title: &'a str,
    pub x_labels: Vec<String>,
    pub y_max: f64,
    /// Horizontal dashed lines: (y, label).
    pub references: Vec<(f64, &'a str)>,
    pub series: Vec<Series<'a>>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl Chart<'_> {
    pub fn svg(&self) -> String {
        let (width, height) = (840.0, 420.0);
        let (left, right, top, bottom) = (70.0, 300.0, 40.0, 60.0);
        let plot_w = width - left - right;
        let plot_h = height - top - bottom;
        let n = self.x_labels.len().max(2);
        let x = |i: usize| left + plot_w * i as f64 / (n - 1) as f64;
        let y = |v: f64| top + plot_h * (1.0 - (v / self.y_max).clamp(0.0, 1.0));
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{width}" height="{height}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            left + plot_w / 2.0,
            escape(self.title)
        );
        // Grid and y ticks every 0.1.
        let steps = (self.y_max * 10.0).round() as usize;
        for k in 0..=steps {
            let v = k as f64 / 10.0;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#e5e5e5"/><text x="{2}" y="{3:.1}" text-anchor="end">{v:.1}</text>"##,
                y(v),
                left + plot_w,
                left - 8.0,
                y(v) + 4.0
            );
        }
        for (i, label) in self.x_labels.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x(i),
                top + plot_h + 20.0,
                escape(label)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            left + plot_w / 2.0,
            height - 15.0,
            escape(self.x_title)
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{0}" text-anchor="middle" transform="rotate(-90 18 {0})">{1}</text>"#,
            top + plot_h / 2.0,
            escape(self.y_title)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>"##
        );
        for (v, label) in &self.references {
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#444" stroke-dasharray="5,4"/><text x="{2}" y="{3:.1}" fill="#444">{4}</text>"##,
                y(*v),
                left + plot_w,
                left + 6.0,
                y(*v) - 4.0,
                escape(label)
            );
        }
        for (k, series) in self.series.iter().enumerate() {
            let points: Vec<String> = series
                .values
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", x(i), y(v))))
                .collect();
            let dash = if series.dashed {
                r#" stroke-dasharray="7,4""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2.5"{dash}/>"#,
                points.join(" "),
                series.color
            );
            for point in &points {
                let (px, py) = point.split_once(',').expect("x,y");
                let _ = writeln!(s, r#"<circle cx="{px}" cy="{py}" r="4" fill="{}"/>"#, series.color);
            }
            let ly = top + 10.0 + 22.0 * k as f64;
            let lx = left + plot_w + 20.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2.5"{dash}/><text x="{}" y="{}">{}</text>"#,
                lx + 24.0,
                series.color,
                lx + 30.0,
                ly + 4.0,
                escape(series.label)
            );
        }
        s += "</svg>\n";
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_polyline_per_series_with_a_point_per_value() {
        let chart = Chart {
            title: "t <1>",
            x_title: "x",
            y_title: "y",
            x_labels: vec!["100".into(), "1000".into(), "10000".into()],
            y_max: 1.2,
            references: vec![(1.0, "direct")],
            series: vec![
                Series {
                    label: "a",
                    color: "red",
                    values: vec![Some(1.0), Some(0.5), None],
                    dashed: false,
                },
                Series {
                    label: "b",
                    color: "blue",
                    values: vec![Some(0.9), Some(0.9), Some(0.9)],
                    dashed: true,
                },
            ],
        };
        let svg = chart.svg();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 5);
        assert!(svg.contains("t &lt;1&gt;"));
        assert_eq!(
            svg.matches("stroke-dasharray=\"7,4\"").count(),
            2,
            "b's line and its legend"
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }
}
