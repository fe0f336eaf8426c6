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
    match scaled(num, mult) {
        Ok(b) if b <= u64::MAX as u128 => Ok(b as u64),
        Ok(_) | Err(Scaled::TooLarge) => Err(format!("{s:?} is too large")),
        Err(Scaled::NotANumber) => Err(format!("{s:?} is not a size")),
    }
}

enum Scaled {
    NotANumber,
    TooLarge,
}

/// `num` (digits with at most one `.`) times `mult`, rounded to the nearest
/// integer, in exact integer arithmetic: through f64 an integer above 2^53
/// would lose its low bits.
fn scaled(num: &str, mult: u64) -> Result<u128, Scaled> {
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return Err(Scaled::NotANumber);
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| Scaled::TooLarge)? };
    // 20 fraction digits are finer than any multiplier (at most 2^60) can
    // show, and keep `frac * mult` within u128.
    let frac = &frac[..frac.len().min(20)];
    let (f, den) = (if frac.is_empty() { 0 } else { frac.parse::<u128>().unwrap_or(0) }, 10u128.pow(frac.len() as u32));
    let whole = int.checked_mul(mult as u128).ok_or(Scaled::TooLarge)?;
    whole.checked_add((f * mult as u128 + den / 2) / den).ok_or(Scaled::TooLarge)
}

/// A size, or a percent of something not known yet (a filesystem's size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    Bytes(u64),
    /// Tenths of a percent, so `2.5%` is exact.
    PerMille(u64),
}

impl Share {
    /// The bytes this share is of a whole of `total` bytes.
    pub fn of(&self, total: u64) -> u64 {
        match *self {
            Share::Bytes(b) => b,
            Share::PerMille(pm) => (total as u128 * pm as u128 / 1000) as u64,
        }
    }
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Share::Bytes(b) => f.write_str(&format_bytes(b)),
            Share::PerMille(pm) if pm % 10 == 0 => write!(f, "{}%", pm / 10),
            Share::PerMille(pm) => write!(f, "{}.{}%", pm / 10, pm % 10),
        }
    }
}

/// Parses a size (`5Gi`) or a percent (`10%`, `2.5%`, at most 100%).
pub fn parse_share(s: &str) -> Result<Share, String> {
    let t = s.trim();
    let Some(num) = t.strip_suffix('%') else { return parse_bytes(t).map(Share::Bytes) };
    let v: f64 =
        num.trim().parse().map_err(|_| format!("{s:?} is not a percent: use 10% or 2.5%, or a size like 5Gi"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?}: a percent between 0% and 100%"));
    }
    Ok(Share::PerMille((v * 10.0).round() as u64))
}

/// Parses a CPU amount into millicores: `2` is 2000, `0.5` and `500m` are 500.
pub fn parse_millicpus(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, scale) = match s.strip_suffix('m') {
        Some(n) => (n, 1),
        None => (s, 1000),
    };
    let not_positive = || format!("{s:?} is not a positive CPU amount (at least 1m)");
    match scaled(num.strip_prefix('-').unwrap_or(num), scale) {
        _ if num.starts_with('-') => Err(not_positive()),
        Ok(0) => Err(not_positive()),
        Ok(m) if m <= u64::MAX as u128 => Ok(m as u64),
        Ok(_) | Err(Scaled::TooLarge) => Err(format!("{s:?} is too large a CPU amount")),
        Err(Scaled::NotANumber) => Err(format!("{s:?} is not a CPU amount: use 2, 0.5 or 500m")),
    }
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
    // Rounded to a tenth of a MiB only below 2^53, where f64 is exact:
    // above it the rounding can go past u64::MAX, and the rendering would
    // no longer read back as a size (found by fuzz/quantity).
    if b >= 1 << 20 && b < 1 << 53 {
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
        assert!(parse_bytes(".").is_err());
        assert_eq!(parse_bytes(".5Ki").unwrap(), 512);
    }

    #[test]
    fn sizes_are_exact_above_2_pow_53() {
        // Through f64 these lose their low bits or round up past u64::MAX.
        assert_eq!(parse_bytes("9007199254740993").unwrap(), (1 << 53) + 1);
        assert_eq!(parse_bytes("18446744073709551615").unwrap(), u64::MAX);
        assert!(parse_bytes("18446744073709551616").unwrap_err().contains("too large"));
        assert_eq!(parse_bytes("8Ei").unwrap(), 1 << 63);
        assert!(parse_bytes("16Ei").unwrap_err().contains("too large"));
        assert_eq!(parse_bytes("9007199254740993k").unwrap(), 9_007_199_254_740_993_000);
        assert_eq!(parse_bytes("0.000000001Gi").unwrap(), 1);
        assert_eq!(parse_millicpus("9007199254740993m").unwrap(), (1 << 53) + 1);
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_millicpus("2").unwrap(), 2000);
        assert_eq!(parse_millicpus("0.5").unwrap(), 500);
        assert_eq!(parse_millicpus("500m").unwrap(), 500);
        assert!(parse_millicpus("0").is_err());
        assert!(parse_millicpus("-1").is_err());
        assert!(parse_millicpus("two").is_err());
        assert!(parse_millicpus("0.0004").is_err());
        assert_eq!(parse_millicpus("1.5").unwrap(), 1500);
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(2 << 30), "2Gi");
        assert_eq!(format_bytes(512 << 20), "512Mi");
        assert_eq!(format_bytes(1000), "1000");
        // Reads back as a size at the top of the range too.
        assert_eq!(format_bytes(u64::MAX), u64::MAX.to_string());
        assert_eq!(parse_bytes(&format_bytes(u64::MAX)).unwrap(), u64::MAX);
    }

    #[test]
    fn shares_are_sizes_or_percents() {
        assert_eq!(parse_share("5Gi").unwrap(), Share::Bytes(5 << 30));
        assert_eq!(parse_share("10%").unwrap(), Share::PerMille(100));
        assert_eq!(parse_share("2.5%").unwrap().of(1000), 25);
        assert_eq!(parse_share("10%").unwrap().of(200 << 30), 20 << 30);
        assert_eq!(parse_share("0").unwrap().of(1 << 40), 0);
        assert_eq!(parse_share("2.5%").unwrap().to_string(), "2.5%");
        for bad in ["101%", "-1%", "ten%", "%"] {
            assert!(parse_share(bad).is_err(), "{bad}");
        }
    }
}
