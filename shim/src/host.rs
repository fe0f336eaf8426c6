//! Small facts about the host that the agent, the shim and the tests all
//! need, kept once: random ids and Go's name for this architecture.

/// `N` bytes from the kernel's random pool (getrandom(2)). Panics only if
/// the kernel has none to give, which no supported kernel does.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("getrandom(2) works");
    b
}

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("getrandom(2) works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 12 hex chars: short enough for socket paths and cgroup names, wide
/// enough never to collide on one node.
pub fn random_id() -> String {
    random_hex(6)
}

/// A random u64, e.g. for an id-map slot or a test tag.
pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes())
}

/// Go's name (`GOARCH`, as in `kubernetes.io/arch`) of a Rust architecture
/// name; endian-dependent names follow this build's endianness. The CSI
/// topology and the Node label both use it, so they always agree.
pub fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        other => other,
    }
}

/// This build's architecture, Go-named.
pub fn this_arch() -> &'static str {
    go_arch(std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_names() {
        assert_eq!(go_arch("x86_64"), "amd64");
        assert_eq!(go_arch("aarch64"), "arm64");
        assert_eq!(go_arch("x86"), "386");
        assert_eq!(go_arch("loongarch64"), "loong64");
        assert_eq!(go_arch("s390x"), "s390x");
        // The CSI topology's old copy passed "powerpc64" through unchanged.
        let ppc = if cfg!(target_endian = "little") { "ppc64le" } else { "ppc64" };
        assert_eq!(go_arch("powerpc64"), ppc);
    }

    #[test]
    fn ids_are_hex_and_differ() {
        let (a, b) = (random_id(), random_id());
        assert_eq!(a.len(), 12);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, b);
        assert_eq!(random_hex(12).len(), 24);
        assert_ne!(random_u64(), random_u64());
    }
}
