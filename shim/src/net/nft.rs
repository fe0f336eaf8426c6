//! An instance's element in berth's nftables table: `inner address . host
//! veth` in the set `builds`, which the firewall's rules use to accept a
//! build's packets only from its own /30 address on its own veth (anything
//! else is spoofed and dropped). Plus the reads the agent needs: the set's
//! elements (sweep, leak scan) and the table's named counters (metrics).
//!
//! Hand-written nf_tables netlink (one batch of three messages over a
//! `netlink-sys` socket) rather than a crate or the `nft` binary: an `nft`
//! exec costs about 6 ms on the 2-core test machine (the whole start budget
//! is 5 ms), the `nftables` crate pipes JSON to that same binary, and the
//! netlink crates for nf_tables (`nftnl`, `rustables`) bind the C libraries
//! or are not in the field's lock files; an add below takes about 0.1 ms
//! (bench figure 8). The rules themselves stay `nft` text, written once at
//! start.
#![forbid(unsafe_code)]

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use std::io;
use std::net::Ipv4Addr;

/// The set of `ipv4_addr . ifname` elements, one per live instance.
pub const BUILDS_SET: &str = "builds";

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_GETOBJ: u16 = 19;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_INET: u8 = 1;
const IFNAMSIZ: usize = 16;
const NFT_OBJECT_COUNTER: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables netlink socket: {0}")]
    Socket(io::Error),
    #[error("nftables: {what} in table inet {table}: {source}")]
    Kernel { what: String, table: String, source: io::Error },
    #[error("nftables: malformed reply to {0}")]
    Malformed(&'static str),
}

impl NftError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            NftError::Socket(_) => "nft_socket",
            NftError::Kernel { .. } => "nft_kernel",
            NftError::Malformed(_) => "nft_malformed",
        }
    }
}

/// The key of an instance's element: 4 bytes of address, then the
/// interface name NUL-padded to IFNAMSIZ (each part fills whole 32-bit
/// registers, as nft lays out a concatenation).
pub fn key(addr: Ipv4Addr, ifname: &str) -> Vec<u8> {
    let mut k = addr.octets().to_vec();
    let name = ifname.as_bytes();
    k.extend_from_slice(&name[..name.len().min(IFNAMSIZ - 1)]);
    k.resize(4 + IFNAMSIZ, 0);
    k
}

fn decode_key(k: &[u8]) -> Option<(Ipv4Addr, String)> {
    if k.len() != 4 + IFNAMSIZ {
        return None;
    }
    let name = k[4..].split(|b| *b == 0).next().unwrap_or_default();
    Some((Ipv4Addr::new(k[0], k[1], k[2], k[3]), String::from_utf8_lossy(name).into_owned()))
}

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn message(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) {
    let len = 16 + 4 + attrs.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[family, 0]);
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(attrs);
}

/// `(type without flags, payload)` of each attribute in `buf`.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED & !0x4000;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, payload))
    })
}

fn find(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

struct Conn {
    sock: Socket,
    seq: u32,
}

impl Conn {
    fn open() -> Result<Conn, NftError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
        sock.bind_auto().map_err(NftError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(NftError::Socket)?;
        Ok(Conn { sock, seq: std::process::id().wrapping_mul(1000) })
    }

    fn next(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `msgs` and reads replies until the one with `seq` ends:
    /// the ack (Ok(collected payloads)) or an error, or NLMSG_DONE of a dump.
    fn exchange(&mut self, msgs: &[u8], seq: u32) -> Result<Vec<Vec<u8>>, io::Error> {
        self.sock.send(msgs, 0)?;
        let mut out = Vec::new();
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            let mut b = &buf[..];
            while b.len() >= 16 {
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let ty = u16::from_ne_bytes([b[4], b[5]]);
                let s = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if len < 16 || len > b.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let payload = &b[16..len];
                b = &b[len.next_multiple_of(4).min(b.len())..];
                match ty {
                    NLMSG_ERROR => {
                        let code = payload.get(..4).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])).unwrap_or(0);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        if s == seq {
                            return Ok(out);
                        }
                    }
                    NLMSG_DONE if s == seq => return Ok(out),
                    _ if s == seq => out.push(payload.get(4..).unwrap_or_default().to_vec()),
                    _ => {}
                }
            }
        }
    }

    /// One set-element change in its own batch (nf_tables changes only
    /// through batches), acked.
    fn elem(&mut self, msg: u16, table: &str, set: &str, k: &[u8]) -> Result<(), io::Error> {
        let mut value = Vec::new();
        attr(&mut value, 1, k); // NFTA_DATA_VALUE
        let mut keyattr = Vec::new();
        attr(&mut keyattr, 1 | NLA_F_NESTED, &value); // NFTA_SET_ELEM_KEY
        let mut elem = Vec::new();
        attr(&mut elem, 1 | NLA_F_NESTED, &keyattr); // NFTA_LIST_ELEM
        let mut a = Vec::new();
        attr(&mut a, 1, &cstr(table)); // NFTA_SET_ELEM_LIST_TABLE
        attr(&mut a, 2, &cstr(set)); // NFTA_SET_ELEM_LIST_SET
        attr(&mut a, 3 | NLA_F_NESTED, &elem); // NFTA_SET_ELEM_LIST_ELEMENTS
        let (b, s, e) = (self.next(), self.next(), self.next());
        let mut buf = Vec::with_capacity(128);
        message(&mut buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, b, 0, NFNL_SUBSYS_NFTABLES, &[]);
        let flags = NLM_F_REQUEST | NLM_F_ACK | if msg == NFT_MSG_NEWSETELEM { NLM_F_CREATE } else { 0 };
        message(&mut buf, NFNL_SUBSYS_NFTABLES << 8 | msg, flags, s, NFPROTO_INET, 0, &a);
        message(&mut buf, NFNL_MSG_BATCH_END, NLM_F_REQUEST, e, 0, NFNL_SUBSYS_NFTABLES, &[]);
        self.exchange(&buf, s).map(|_| ())
    }

    fn dump(&mut self, msg: u16, a: &[u8]) -> Result<Vec<Vec<u8>>, io::Error> {
        let s = self.next();
        let mut buf = Vec::new();
        message(&mut buf, NFNL_SUBSYS_NFTABLES << 8 | msg, NLM_F_REQUEST | NLM_F_DUMP, s, NFPROTO_INET, 0, a);
        self.exchange(&buf, s)
    }
}

fn kernel(what: String, table: &str) -> impl FnOnce(io::Error) -> NftError + '_ {
    move |source| NftError::Kernel { what, table: table.to_string(), source }
}

/// Adds `addr . ifname` to the `builds` set of `table` (idempotent).
pub fn add_build(table: &str, addr: Ipv4Addr, ifname: &str) -> Result<(), NftError> {
    Conn::open()?
        .elem(NFT_MSG_NEWSETELEM, table, BUILDS_SET, &key(addr, ifname))
        .map_err(kernel(format!("add element {addr} . \"{ifname}\" to set {BUILDS_SET}"), table))
}

/// Removes `addr . ifname` from the `builds` set; Ok(false) when it (or
/// the table) was already gone.
pub fn remove_build(table: &str, addr: Ipv4Addr, ifname: &str) -> Result<bool, NftError> {
    match Conn::open()?.elem(NFT_MSG_DELSETELEM, table, BUILDS_SET, &key(addr, ifname)) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(kernel(format!("delete element {addr} . \"{ifname}\" from set {BUILDS_SET}"), table)(e)),
    }
}

/// The elements of the `builds` set of `table`.
pub fn builds(table: &str) -> Result<Vec<(Ipv4Addr, String)>, NftError> {
    let mut a = Vec::new();
    attr(&mut a, 1, &cstr(table));
    attr(&mut a, 2, &cstr(BUILDS_SET));
    let replies =
        Conn::open()?.dump(NFT_MSG_GETSETELEM, &a).map_err(kernel(format!("list set {BUILDS_SET}"), table))?;
    let mut out = Vec::new();
    for r in &replies {
        let Some(list) = find(r, 3) else { continue };
        for (_, elem) in attrs(list) {
            let k = find(elem, 1).and_then(|k| find(k, 1)).and_then(decode_key);
            out.push(k.ok_or(NftError::Malformed("list set builds"))?);
        }
    }
    Ok(out)
}

/// `(name, packets, bytes)` of every named counter of `table`.
pub fn counters(table: &str) -> Result<Vec<(String, u64, u64)>, NftError> {
    let mut a = Vec::new();
    attr(&mut a, 1, &cstr(table)); // NFTA_OBJ_TABLE
    attr(&mut a, 3, &NFT_OBJECT_COUNTER.to_be_bytes()); // NFTA_OBJ_TYPE
    let replies = Conn::open()?.dump(NFT_MSG_GETOBJ, &a).map_err(kernel("list counters".into(), table))?;
    let u64be = |p: Option<&[u8]>| p.and_then(|p| p.try_into().ok()).map(u64::from_be_bytes);
    let mut out = Vec::new();
    for r in &replies {
        let name = find(r, 2).map(|n| String::from_utf8_lossy(n.split(|b| *b == 0).next().unwrap_or_default()));
        let ty = find(r, 3).and_then(|t| t.try_into().ok()).map(u32::from_be_bytes);
        if ty != Some(NFT_OBJECT_COUNTER) {
            continue;
        }
        let data = find(r, 4).ok_or(NftError::Malformed("list counters"))?;
        let (bytes, packets) = (u64be(find(data, 1)), u64be(find(data, 2)));
        match (name, packets, bytes) {
            (Some(n), Some(p), Some(b)) => out.push((n.into_owned(), p, b)),
            _ => return Err(NftError::Malformed("list counters")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_pad_the_name_to_ifnamsiz_and_round_trip() {
        let k = key(Ipv4Addr::new(10, 1, 2, 6), "bkab12xyz");
        assert_eq!(k.len(), 20);
        assert_eq!(&k[..4], &[10, 1, 2, 6]);
        assert_eq!(&k[4..13], b"bkab12xyz");
        assert!(k[13..].iter().all(|b| *b == 0));
        assert_eq!(decode_key(&k), Some((Ipv4Addr::new(10, 1, 2, 6), "bkab12xyz".into())));
        let mut m = Vec::new();
        attr(&mut m, 1, b"abc");
        attr(&mut m, 2, &[]);
        assert_eq!(m.len(), 12);
        assert_eq!(attrs(&m).map(|(t, p)| (t, p.len())).collect::<Vec<_>>(), vec![(1, 3), (2, 0)]);
    }

    /// Against the kernel: needs root and the `nft` binary to make a table.
    #[test]
    fn elements_and_counters_round_trip_through_the_kernel() {
        let table = format!("berth_nftut{}", std::process::id());
        let script = format!(
            "table inet {table} {{\n set builds {{ type ipv4_addr . ifname; }}\n counter refused_x {{ }}\n}}\n"
        );
        let made = std::process::Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn();
        let Ok(mut child) = made else {
            return eprintln!("SKIPPED: no nft binary (apt-get install nftables)");
        };
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success(), "nft -f {script}");
        let a = Ipv4Addr::new(10, 250, 0, 2);
        add_build(&table, a, "bkut0001").unwrap();
        add_build(&table, a, "bkut0001").unwrap();
        add_build(&table, Ipv4Addr::new(10, 250, 0, 6), "bkut0002").unwrap();
        let mut got = builds(&table).unwrap();
        got.sort();
        assert_eq!(got, vec![(a, "bkut0001".into()), (Ipv4Addr::new(10, 250, 0, 6), "bkut0002".into())]);
        let listed =
            std::process::Command::new("nft").args(["list", "set", "inet", &table, "builds"]).output().unwrap();
        assert!(String::from_utf8_lossy(&listed.stdout).contains("10.250.0.2 . \"bkut0001\""));
        assert!(remove_build(&table, a, "bkut0001").unwrap());
        assert!(!remove_build(&table, a, "bkut0001").unwrap());
        assert_eq!(builds(&table).unwrap().len(), 1);
        assert_eq!(counters(&table).unwrap(), vec![("refused_x".to_string(), 0, 0)]);
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", &table]).output();
        assert!(!remove_build(&table, a, "bkut0002").unwrap(), "a missing table reads as gone");
        assert!(matches!(add_build(&table, a, "x"), Err(NftError::Kernel { .. })));
    }
}
