//! Captured output of a child process (an agent, a sibling, the bench's
//! agents): one buffer of lines, each parsed as a JSON log record and
//! stamped with the instant it was read. Waits come in two forms: blocking
//! (a condvar, for plain tests) and async (a `Notify`, for tokio tests and
//! the bench). Also the poll helpers every wait of the harness uses.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How much slower this machine runs the suites than the ones the waits
/// were sized on: `BERTH_TEST_TIME_SCALE` (a whole number, 1 to 20). The
/// cgroup v2 lane sets it when its VM runs under software emulation (TCG),
/// where an agent takes ~10 s to start; a plain run keeps every wait as is.
pub fn time_scale() -> u32 {
    std::env::var("BERTH_TEST_TIME_SCALE").ok().and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(1).clamp(1, 20)
}

/// A wait of the harness, stretched by [`time_scale`].
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// A duration flag of the agent (`--idle-timeout 3s`, `--stop-grace 500ms`:
/// humantime) stretched by [`time_scale`], as milliseconds. A test whose
/// idle timeout must outlast its own next call uses it, so that a slow
/// machine does not reap an instance between two calls of one client.
pub fn scaled_flag(value: &str) -> String {
    let d = humantime::parse_duration(value).unwrap_or_else(|e| panic!("duration {value:?}: {e}"));
    format!("{}ms", scaled(d).as_millis())
}

/// fakeclient's `--timeout <seconds>`, stretched by [`time_scale`].
pub fn scaled_secs(secs: u64) -> String {
    scaled(Duration::from_secs(secs)).as_secs().to_string()
}

/// Calls `f` every `every` until it yields a value or `timeout` passes
/// (then one last call decides).
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// [`poll`] without blocking the async runtime.
pub async fn poll_async<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Parses a log line; tracing's `fields` object (when not flattened) and the
/// fields of the enclosing `span`/`spans` are merged into the top level (an
/// event's own fields win), so `v["instance"]` works either way. A line
/// that is not JSON becomes `{"message": line, "raw": true}`.
pub fn parse_log_line(line: &str) -> Value {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(mut o)) => {
            if let Some(Value::Object(fields)) = o.get("fields").cloned() {
                for (k, v) in fields {
                    o.entry(k).or_insert(v);
                }
            }
            // Fields of the current span, then of the outer ones (innermost wins).
            let mut spans: Vec<Value> = o.get("span").cloned().into_iter().collect();
            if let Some(Value::Array(list)) = o.get("spans") {
                spans.extend(list.iter().rev().cloned());
            }
            for span in spans {
                if let Value::Object(fields) = span {
                    for (k, v) in fields {
                        if k != "name" {
                            o.entry(k).or_insert(v);
                        }
                    }
                }
            }
            Value::Object(o)
        }
        _ => serde_json::json!({"message": line, "raw": true}),
    }
}

/// Waits (up to 1 s) for reader threads from [`LogBuf::capture`] to meet end of
/// file: a child's last lines can still be in the pipe when its exit is
/// seen. Bounded, since a shim that outlives a killed agent holds the pipe.
pub fn drain(readers: &[std::thread::JoinHandle<()>]) {
    let until = Instant::now() + Duration::from_secs(1);
    while !readers.iter().all(|r| r.is_finished()) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One captured line: when it was read, parsed, and as read.
struct Line {
    at: Instant,
    value: Value,
    raw: String,
}

/// Lines of a child's stdout+stderr, shared with the reader threads.
pub struct LogBuf {
    lines: Mutex<Vec<Line>>,
    cond: Condvar,
    notify: tokio::sync::Notify,
}

impl LogBuf {
    pub fn new() -> Arc<LogBuf> {
        Arc::new(LogBuf { lines: Mutex::new(Vec::new()), cond: Condvar::new(), notify: tokio::sync::Notify::new() })
    }

    /// Adds a line. A record spliced after a fragment of a shim's stderr
    /// line (berth-shim writes into the agent's stderr) is salvaged and
    /// marked with `garbled_prefix`.
    pub fn push(&self, line: String) {
        let at = Instant::now();
        let mut v = parse_log_line(&line);
        if v.get("raw").is_some() {
            if let Some(k) = line.find("{\"timestamp\"").filter(|k| *k > 0) {
                let rec = parse_log_line(&line[k..]);
                if rec.get("raw").is_none() {
                    v = rec;
                    v["garbled_prefix"] = Value::String(line[..k].to_string());
                }
            }
        }
        self.lines.lock().unwrap().push(Line { at, value: v, raw: line });
        self.cond.notify_all();
        self.notify.notify_waiters();
    }

    /// Spawns a thread copying `r` line by line into the buffer, and onto
    /// stderr prefixed with `tag` when `echo` is set.
    /// The handle says when the reader has met end of file: a child's last
    /// lines can still be in the pipe when its exit is seen.
    pub fn capture(
        self: &Arc<Self>,
        r: impl Read + Send + 'static,
        tag: String,
        echo: bool,
    ) -> std::thread::JoinHandle<()> {
        let buf = self.clone();
        std::thread::Builder::new()
            .name(format!("log {tag}"))
            .spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    if echo {
                        eprintln!("{tag} {line}");
                    }
                    buf.push(line);
                }
            })
            .expect("spawn log thread")
    }

    /// The number of lines so far: a mark to look from.
    pub fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Parsed lines from `from` on.
    pub fn values(&self, from: usize) -> Vec<Value> {
        self.lines.lock().unwrap().iter().skip(from).map(|l| l.value.clone()).collect()
    }

    /// Raw lines from `from` on.
    pub fn raw_lines(&self, from: usize) -> Vec<String> {
        self.lines.lock().unwrap().iter().skip(from).map(|l| l.raw.clone()).collect()
    }

    /// The last `n` raw lines, newline-joined (for panic messages).
    pub fn tail(&self, n: usize) -> String {
        let g = self.lines.lock().unwrap();
        let k = g.len().saturating_sub(n);
        g[k..].iter().map(|l| l.raw.as_str()).collect::<Vec<_>>().join("\n")
    }

    pub fn count(&self, from: usize, pred: impl Fn(&Value) -> bool) -> usize {
        self.lines.lock().unwrap().iter().skip(from).filter(|l| pred(&l.value)).count()
    }

    /// Lines from `from` on whose raw text contains `needle`.
    pub fn raw_count(&self, from: usize, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().skip(from).filter(|l| l.raw.contains(needle)).count()
    }

    /// Lines from `from` on that hold a JSON log record (`{"timestamp"`)
    /// but do not parse: a record spliced with other output.
    pub fn garbled(&self, from: usize) -> Vec<String> {
        let g = self.lines.lock().unwrap();
        g.iter()
            .skip(from)
            .filter(|l| {
                l.raw.contains("{\"timestamp\"")
                    && (l.value.get("raw").is_some() || l.value.get("garbled_prefix").is_some())
            })
            .map(|l| l.raw.clone())
            .collect()
    }

    /// The first line from `from` on matching `pred`, with when it was read.
    pub fn find_from(&self, from: usize, pred: impl Fn(&Value) -> bool) -> Option<(Instant, Value)> {
        let g = self.lines.lock().unwrap();
        g.iter().skip(from).find(|l| pred(&l.value)).map(|l| (l.at, l.value.clone()))
    }

    /// [`find_from`](Self::find_from), blocking up to `timeout` for the line.
    pub fn wait_blocking(&self, from: usize, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + scaled(timeout);
        let mut g = self.lines.lock().unwrap();
        let mut seen = from;
        loop {
            if let Some(l) = g.iter().skip(seen).find(|l| pred(&l.value)) {
                return Some(l.value.clone());
            }
            seen = g.len().max(from);
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.cond.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// [`find_from`](Self::find_from), waiting up to `timeout` without
    /// blocking the async runtime.
    pub async fn wait(
        &self,
        from: usize,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<(Instant, Value)> {
        let deadline = tokio::time::Instant::now() + scaled(timeout);
        loop {
            let notified = self.notify.notified();
            if let Some(hit) = self.find_from(from, &pred) {
                return Some(hit);
            }
            // Also wake periodically: a line may land between the check and the await.
            if tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_millis(50)), notified)
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return None;
            }
        }
    }

    /// Waits until at least `n` lines from `from` on match `pred`.
    pub async fn wait_count(&self, from: usize, n: usize, pred: impl Fn(&Value) -> bool, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + scaled(timeout);
        loop {
            let notified = self.notify.notified();
            if self.count(from, &pred) >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_flags_keep_their_unit_and_stretch() {
        let k = time_scale() as u128;
        assert_eq!(scaled_flag("3s"), format!("{}ms", 3000 * k));
        assert_eq!(scaled_flag("500ms"), format!("{}ms", 500 * k));
        assert_eq!(scaled_secs(20), (20 * k).to_string());
        assert!(humantime::parse_duration(&scaled_flag("1m 5s")).is_ok());
    }

    #[test]
    fn salvages_a_record_spliced_after_a_fragment() {
        let b = LogBuf::new();
        b.push("plain text".into());
        b.push("berth-shim[x]: ha{\"timestamp\":\"t\",\"message\":\"instance ready\"}".into());
        let v = b.values(0);
        assert_eq!(v[0]["raw"], true);
        assert_eq!(v[1]["message"], "instance ready");
        assert_eq!(v[1]["garbled_prefix"], "berth-shim[x]: ha");
        assert_eq!(b.garbled(0).len(), 1);
        assert_eq!(b.raw_count(0, "timestamp"), 1);
        assert!(b.wait_blocking(1, |v| v["message"] == "instance ready", Duration::ZERO).is_some());
        assert_eq!(b.tail(1), b.raw_lines(1)[0]);
    }
}
