//! Where an instance's start spends its time: named step durations, in
//! milliseconds, rendered as `name=ms` pairs in one log field (the agent's
//! `instance ready` line carries its own, the shim's `daemon pid .. started`
//! line the shim's). berth-bench figure 1 parses both into its breakdown
//! rows (docs/benchmarks.md). Timing a step is two clock reads, so it is
//! always on: a start is measured in the field as in the bench.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// Durations of named steps, in the order they were recorded.
#[derive(Debug, Clone)]
pub struct Steps {
    last: Instant,
    steps: Vec<(String, Duration)>,
}

impl Default for Steps {
    fn default() -> Steps {
        Steps::new()
    }
}

impl Steps {
    pub fn new() -> Steps {
        Steps { last: Instant::now(), steps: Vec::new() }
    }

    /// Records the time since the previous mark (or since `new`) as `name`.
    pub fn mark(&mut self, name: &str) {
        let now = Instant::now();
        self.steps.push((name.to_string(), now - self.last));
        self.last = now;
    }

    /// Records a duration measured elsewhere (a step run concurrently).
    pub fn add(&mut self, name: &str, d: Duration) {
        self.steps.push((name.to_string(), d));
    }

    /// Appends `other`'s steps, each name prefixed with `prefix.`.
    pub fn nest(&mut self, prefix: &str, other: &Steps) {
        for (n, d) in &other.steps {
            self.steps.push((format!("{prefix}.{n}"), *d));
        }
    }

    /// Restarts the clock for the next [`mark`](Self::mark) (after a step
    /// recorded with [`add`](Self::add)).
    pub fn reset(&mut self) {
        self.last = Instant::now();
    }

    /// `name=ms` pairs, space-separated, three decimals.
    pub fn render(&self) -> String {
        let pairs: Vec<String> = self.steps.iter().map(|(n, d)| format!("{n}={:.3}", d.as_secs_f64() * 1e3)).collect();
        pairs.join(" ")
    }
}

/// The pairs of a [`Steps::render`] string; malformed pairs are skipped.
pub fn parse(s: &str) -> Vec<(String, f64)> {
    s.split_whitespace()
        .filter_map(|p| {
            let (n, v) = p.split_once('=')?;
            Some((n.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_nest_and_round_trip() {
        let mut s = Steps::new();
        std::thread::sleep(Duration::from_millis(2));
        s.mark("a");
        s.add("b", Duration::from_micros(1500));
        let mut inner = Steps::new();
        inner.add("x", Duration::from_micros(250));
        s.nest("disk", &inner);
        let r = s.render();
        let p = parse(&r);
        assert_eq!(p.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a", "b", "disk.x"], "{r}");
        assert!(p[0].1 >= 2.0, "{r}");
        assert_eq!(p[1].1, 1.5);
        assert_eq!(p[2].1, 0.25);
        assert_eq!(parse("a=1 junk b=x c=2.5"), vec![("a".to_string(), 1.0), ("c".to_string(), 2.5)]);
    }
}
