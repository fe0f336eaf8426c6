//! Statistics and the result table.

use serde_json::{json, Value};

/// Nearest-rank percentile (`p` in 0..=100) of `v`; NaN for no samples.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

pub fn p50(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

pub fn p99(v: &[f64]) -> f64 {
    percentile(v, 99.0)
}

/// min/p50/p90/p99/max/mean of a sample set, for the JSON details.
pub fn summary(v: &[f64]) -> Value {
    let mean = if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 };
    json!({
        "n": v.len(),
        "min": percentile(v, 0.0),
        "p50": p50(v),
        "p90": percentile(v, 90.0),
        "p99": p99(v),
        "max": percentile(v, 100.0),
        "mean": mean,
    })
}

/// How a row's goal is judged.
#[derive(Debug, Clone)]
pub enum Goal {
    None,
    /// berth at most this.
    AtMost(f64),
    /// berth under this (strict).
    Below(f64),
    /// berth minus baseline at most this (start overhead).
    OverheadAtMost(f64),
    /// berth / baseline at least this (throughput).
    RatioAtLeast(f64),
}

/// One line of the table: a figure's metric, berth's value, the same-run
/// baseline, their ratio (berth / baseline) and the goal.
#[derive(Debug, Clone)]
pub struct Row {
    /// `1 start`, `2 throughput`, ... (the test looks for these names).
    pub figure: &'static str,
    pub metric: String,
    pub unit: &'static str,
    pub berth: f64,
    pub baseline: Option<f64>,
    /// What the baseline is, for the JSON and the docs.
    pub baseline_is: String,
    pub goal: Goal,
    pub goal_text: String,
}

impl Row {
    pub fn new(figure: &'static str, metric: impl Into<String>, unit: &'static str, berth: f64) -> Row {
        Row {
            figure,
            metric: metric.into(),
            unit,
            berth,
            baseline: None,
            baseline_is: String::new(),
            goal: Goal::None,
            goal_text: String::new(),
        }
    }

    pub fn baseline(mut self, v: f64, what: impl Into<String>) -> Row {
        self.baseline = Some(v);
        self.baseline_is = what.into();
        self
    }

    pub fn goal(mut self, g: Goal, text: impl Into<String>) -> Row {
        self.goal = g;
        self.goal_text = text.into();
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        match self.baseline {
            Some(b) if b > 0.0 && b.is_finite() && self.berth.is_finite() => Some(self.berth / b),
            _ => None,
        }
    }

    /// Whether the goal is met, and the number it was judged on.
    pub fn met(&self) -> Option<(bool, String)> {
        let b = self.berth;
        match self.goal {
            Goal::None => None,
            Goal::AtMost(x) => Some((b <= x, String::new())),
            Goal::Below(x) => Some((b < x, String::new())),
            Goal::OverheadAtMost(x) => {
                let base = self.baseline?;
                let over = b - base;
                Some((over <= x, format!("{:+.2} {}", over, self.unit)))
            }
            Goal::RatioAtLeast(x) => {
                let r = self.ratio()?;
                Some((r >= x, String::new()))
            }
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "figure": self.figure,
            "metric": self.metric,
            "unit": self.unit,
            "berth": finite(self.berth),
            "baseline": self.baseline.and_then(finite),
            "baseline_is": self.baseline_is,
            "ratio": self.ratio().and_then(finite),
            "goal": self.goal_text,
            "met": self.met().map(|(m, _)| m),
        })
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

pub fn fmt_value(x: f64, unit: &str) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let digits = if x.abs() >= 100.0 || unit == "count" {
        if x.fract() == 0.0 || x.abs() >= 100.0 {
            0
        } else {
            1
        }
    } else if x.abs() >= 10.0 {
        1
    } else {
        2
    };
    if unit == "count" || unit.is_empty() {
        format!("{x:.digits$}")
    } else {
        format!("{x:.digits$} {unit}")
    }
}

/// The table as markdown (it reads as plain text too).
pub fn table(rows: &[Row]) -> String {
    let mut lines = vec![vec![
        "figure".to_string(),
        "metric".into(),
        "berth".into(),
        "baseline".into(),
        "ratio".into(),
        "goal".into(),
        "met".into(),
    ]];
    for r in rows {
        let met = match r.met() {
            None => "-".to_string(),
            Some((m, extra)) => {
                let word = if m { "yes" } else { "NO" };
                if extra.is_empty() {
                    word.to_string()
                } else {
                    format!("{word} ({extra})")
                }
            }
        };
        lines.push(vec![
            r.figure.to_string(),
            r.metric.clone(),
            fmt_value(r.berth, r.unit),
            r.baseline.map(|b| fmt_value(b, r.unit)).unwrap_or_else(|| "-".into()),
            r.ratio()
                .map(|x| if x < 0.1 { format!("{x:.3}x") } else { format!("{x:.2}x") })
                .unwrap_or_else(|| "-".into()),
            if r.goal_text.is_empty() { "-".into() } else { r.goal_text.clone() },
            met,
        ]);
    }
    let ncol = lines[0].len();
    let width: Vec<usize> = (0..ncol).map(|c| lines.iter().map(|l| l[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let pad = width[c] - s.chars().count();
                // Numbers right-aligned, text left-aligned.
                if (2..=4).contains(&c) && i > 0 {
                    format!("{}{s}", " ".repeat(pad))
                } else {
                    format!("{s}{}", " ".repeat(pad))
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
        if i == 0 {
            let seps: Vec<String> = width
                .iter()
                .enumerate()
                .map(|(c, w)| if (2..=4).contains(&c) { format!("{}:", "-".repeat(w - 1)) } else { "-".repeat(*w) })
                .collect();
            out.push_str(&format!("| {} |\n", seps.join(" | ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=200).map(|x| x as f64).collect();
        assert_eq!(p50(&v), 100.0);
        assert_eq!(p99(&v), 198.0);
        assert_eq!(percentile(&v, 100.0), 200.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!(p50(&[]).is_nan());
    }
}
