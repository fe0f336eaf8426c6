//! The `--extended-resource-name` flag: its default and its check. Here,
//! with the other flags, so that parsing flags needs nothing of the
//! publisher that uses the name.

pub const DEFAULT_RESOURCE: &str = "berth.dev/build";

/// Checks an extended resource name: `<domain>/<name>`, the domain a DNS
/// subdomain outside `kubernetes.io`, the name a qualified-name part.
pub fn parse_resource_name(s: &str) -> Result<String, String> {
    let fail = |why: &str| Err(format!("{s:?}: {why}; use a name like berth.dev/build"));
    let Some((domain, name)) = s.split_once('/') else {
        return fail("an extended resource name needs a domain prefix");
    };
    let dns_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.len() > 253 || !domain.split('.').all(dns_label) {
        return fail("the prefix is not a lowercase DNS subdomain");
    }
    if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") || domain.starts_with("requests.") {
        return fail("kubernetes.io names and requests.* are reserved");
    }
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if !name_ok {
        return fail("the name after the slash is not a valid qualified name (at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends)");
    }
    Ok(s.to_string())
}
