//! Kubernetes quantity notation for sizes (`256Mi`, `4Gi`, `1G`, `1500000`)
//! and CPUs (`2`, `0.5`, `500m`), so the chart can pass the same strings a
//! pod spec uses.

/// Parses a byte size. Binary (`Ki`..`Ei`) and decimal (`k`, `M`, `G`, ...)
/// suffixes are accepted, as in a Kubernetes resource quantity.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size: expected a number with an optional suffix, like 512Mi or 4Gi"));
    }
    let mult: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size suffix {other:?} in {s:?}: use Ki, Mi, Gi, Ti (binary) or k, M, G, T (decimal)"
            ))
        }
    };
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a CPU amount into millicores: `2` is 2000, `0.5` and `500m` are 500.
pub fn parse_millicpus(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, scale) = match s.strip_suffix('m') {
        Some(n) => (n, 1.0),
        None => (s, 1000.0),
    };
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a CPU amount: use 2, 0.5 or 500m"))?;
    let millis = (value * scale).round();
    if millis < 1.0 || millis.is_nan() || !millis.is_finite() {
        return Err(format!("{s:?} is not a positive CPU amount (at least 1m)"));
    }
    Ok(millis as u64)
}

/// Like `parse_millicpus`, but 0 is allowed (a reserve of nothing).
pub fn parse_millicpus_or_zero(s: &str) -> Result<u64, String> {
    if s.trim().trim_end_matches('m').parse::<f64>() == Ok(0.0) {
        return Ok(0);
    }
    parse_millicpus(s)
}

/// Renders bytes the way they were most likely written (`2Gi`, `512Mi`).
pub fn format_bytes(b: u64) -> String {
    for (unit, size) in [("Ti", 1u64 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if b >= size && b.is_multiple_of(size) {
            return format!("{}{unit}", b / size);
        }
    }
    if b >= 1 << 20 {
        return format!("{:.1}Mi", b as f64 / (1u64 << 20) as f64);
    }
    b.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("256Mi").unwrap(), 256 << 20);
        assert_eq!(parse_bytes("4Gi").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("4GB").unwrap_err().contains("unknown size suffix"));
        assert!(parse_bytes("Gi").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("1.2.3Mi").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_millicpus("2").unwrap(), 2000);
        assert_eq!(parse_millicpus("0.5").unwrap(), 500);
        assert_eq!(parse_millicpus("500m").unwrap(), 500);
        assert!(parse_millicpus("0").is_err());
        assert!(parse_millicpus("-1").is_err());
        assert!(parse_millicpus("two").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(2 << 30), "2Gi");
        assert_eq!(format_bytes(512 << 20), "512Mi");
        assert_eq!(format_bytes(1000), "1000");
    }
}
