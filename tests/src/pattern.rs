//! The deterministic content of `Fake.Stream` (and of the files `Fake.WriteFiles`
//! writes): byte `i` of the stream is [`pattern_byte(i)`](pattern_byte), so a
//! client can check what it received without the server sending a digest.

/// splitmix64: a cheap, well-mixed function of the word index.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Byte `i` of the pattern: byte `i % 8` (little endian) of `mix(i / 8)`. Not
/// periodic, so a lost, duplicated or reordered chunk changes the checksum.
pub fn pattern_byte(i: u64) -> u8 {
    (mix(i >> 3) >> ((i & 7) * 8)) as u8
}

/// Fills `buf` with the pattern starting at stream offset `offset`.
pub fn fill(offset: u64, buf: &mut [u8]) {
    let mut k = 0;
    // Unaligned head byte by byte, then whole words.
    while k < buf.len() && (offset + k as u64) & 7 != 0 {
        buf[k] = pattern_byte(offset + k as u64);
        k += 1;
    }
    while k + 8 <= buf.len() {
        let w = mix((offset + k as u64) >> 3).to_le_bytes();
        buf[k..k + 8].copy_from_slice(&w);
        k += 8;
    }
    while k < buf.len() {
        buf[k] = pattern_byte(offset + k as u64);
        k += 1;
    }
}

/// A chunk of the pattern.
pub fn chunk(offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(offset, &mut v);
    v
}

/// FNV-1a 64 over a byte stream, fed incrementally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    state: u64,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum { state: 0xcbf2_9ce4_8422_2325, len: 0 }
    }
}

impl Checksum {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.state ^= b as u64;
            self.state = self.state.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.len += data.len() as u64;
    }
    pub fn value(&self) -> u64 {
        self.state
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn hex(&self) -> String {
        format!("{:016x}", self.state)
    }
}

/// The checksum of the first `total` bytes of the pattern.
pub fn expected(total: u64) -> Checksum {
    let mut c = Checksum::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < total {
        let n = ((total - off) as usize).min(buf.len());
        fill(off, &mut buf[..n]);
        c.update(&buf[..n]);
        off += n as u64;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_checksum_but_reordering_does() {
        let total = 100_000u64;
        let mut a = Checksum::new();
        let mut off = 0;
        for n in [1usize, 7, 4096, 50_000, 45_896] {
            a.update(&chunk(off, n));
            off += n as u64;
        }
        assert_eq!(off, total);
        assert_eq!(a, expected(total));

        let mut b = Checksum::new();
        b.update(&chunk(4096, 4096));
        b.update(&chunk(0, 4096));
        b.update(&chunk(8192, (total - 8192) as usize));
        assert_eq!(b.len(), total);
        assert_ne!(b, expected(total));
    }

    #[test]
    fn pattern_is_not_periodic_in_blocks() {
        assert_ne!(chunk(0, 4096), chunk(4096, 4096));
        assert_ne!(chunk(0, 251), chunk(251, 251));
    }

    #[test]
    fn fill_matches_pattern_byte_at_any_alignment() {
        for off in 0..9u64 {
            let c = chunk(off, 37);
            for (k, b) in c.iter().enumerate() {
                assert_eq!(*b, pattern_byte(off + k as u64), "offset {off} byte {k}");
            }
        }
    }
}
