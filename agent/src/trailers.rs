//! A gRPC refusal written as raw HTTP/2 frames: every request on the
//! connection gets a trailers-only response (one HEADERS frame with
//! END_STREAM) carrying `grpc-status` and `grpc-message`.
//!
//! Why not hyper/h2: the h2 server rejects a request whose `:authority` is
//! not an RFC 3986 host (hyperium/h2#487) with RST_STREAM(PROTOCOL_ERROR),
//! and grpc C-core (Python grpcio, Ruby, PHP), grpc-java and Bazel send the
//! socket path there over unix sockets (C-core 1.85 sends
//! `tmp%2Fx.sock`). Those clients then saw `INTERNAL: Stream removed`
//! instead of berth's answer. A trailers-only response needs none of the
//! client's headers, so nothing here decodes HPACK: the reader only walks
//! frame headers (9 bytes each) to learn stream ids, answers SETTINGS and
//! PING, and skips every payload.
//!
//! Why no HPACK crate: we encode four header fields and never index, so the
//! encoding is one static-table index plus literals without Huffman (RFC 7541
//! 6.1, 6.2.2, 5.1, 5.2); a crate would bring a dynamic table and Huffman
//! code we would never use. The tests decode our frames with an independent
//! decoder.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// SETTINGS_MAX_FRAME_SIZE's default: we never raise it, so a peer must
/// not send more.
const MAX_FRAME: usize = 16_384;
/// The longest `grpc-message` we send, before percent-encoding. Headers of
/// at most 16 KiB fit C-core's default metadata limit and one frame.
const MAX_MESSAGE: usize = 3_000;

/// Answers every request on `stream` with `code`/`message` until the peer
/// closes, sends garbage, or `linger` passes. The peer's bytes are read and
/// dropped frame by frame, so a connection costs a few hundred bytes here.
pub async fn answer(mut stream: UnixStream, code: i32, message: &str, linger: Duration) {
    let _ = tokio::time::timeout(linger, serve(&mut stream, code, message)).await;
    let _ = stream.shutdown().await;
}

async fn serve(stream: &mut UnixStream, code: i32, message: &str) -> std::io::Result<()> {
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let mut preface = [0u8; 24];
    stream.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Ok(());
    }
    let block = header_block(code, message);
    let mut last_stream = 0u32;
    let mut head = [0u8; 9];
    let mut small = [0u8; 8];
    loop {
        if stream.read_exact(&mut head).await.is_err() {
            return Ok(());
        }
        let h = FrameHeader::parse(&head);
        if h.len > MAX_FRAME {
            // FRAME_SIZE_ERROR (0x6): the peer broke the protocol; done.
            stream.write_all(&goaway(last_stream, 0x6)).await?;
            return Ok(());
        }
        // PING's payload is echoed; everything else is skipped.
        if h.kind == PING && h.len == 8 {
            stream.read_exact(&mut small).await?;
        } else {
            skip(stream, h.len).await?;
        }
        match h.kind {
            SETTINGS if h.flags & ACK == 0 => stream.write_all(&frame(SETTINGS, ACK, 0, &[])).await?,
            PING if h.flags & ACK == 0 && h.len == 8 => stream.write_all(&frame(PING, ACK, 0, &small)).await?,
            // A new client stream (odd id, above the last): its answer.
            HEADERS if h.stream % 2 == 1 && h.stream > last_stream => {
                last_stream = h.stream;
                let f = frame(HEADERS, END_STREAM | END_HEADERS, h.stream, &block);
                stream.write_all(&f).await?;
            }
            GOAWAY => {
                stream.write_all(&goaway(last_stream, 0)).await?;
                return Ok(());
            }
            // DATA, CONTINUATION, WINDOW_UPDATE, RST_STREAM, PRIORITY: nothing
            // to say (our answers are sent; a client's body is not read).
            _ => {}
        }
    }
}

async fn skip(stream: &mut UnixStream, mut n: usize) -> std::io::Result<()> {
    let mut sink = [0u8; 512];
    while n > 0 {
        let k = n.min(sink.len());
        stream.read_exact(&mut sink[..k]).await?;
        n -= k;
    }
    Ok(())
}

/// The fixed 9-byte header of an HTTP/2 frame (RFC 9113 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    pub fn parse(b: &[u8; 9]) -> FrameHeader {
        FrameHeader {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize,
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn goaway(last_stream: u32, code: u32) -> Vec<u8> {
    let mut p = last_stream.to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    frame(GOAWAY, 0, 0, &p)
}

/// The HPACK block of a trailers-only gRPC response.
pub fn header_block(code: i32, message: &str) -> Vec<u8> {
    let mut b = vec![0x88]; // :status 200, static table index 8
                            // content-type (static name index 31), literal without indexing.
    integer(&mut b, 0x00, 4, 31);
    string(&mut b, b"application/grpc");
    for (name, value) in [("grpc-status", code.to_string()), ("grpc-message", percent_encode(message))] {
        b.push(0x00); // literal without indexing, new name
        string(&mut b, name.as_bytes());
        string(&mut b, value.as_bytes());
    }
    b
}

/// An HPACK integer with an `n`-bit prefix after `first`'s high bits.
fn integer(b: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        b.push(first | v as u8);
        return;
    }
    b.push(first | max as u8);
    v -= max;
    while v >= 128 {
        b.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    b.push(v as u8);
}

/// An HPACK string literal, not Huffman-coded.
fn string(b: &mut Vec<u8>, s: &[u8]) {
    integer(b, 0x00, 7, s.len());
    b.extend_from_slice(s);
}

/// gRPC's `grpc-message` encoding: bytes outside 0x20..=0x7E, and `%`,
/// become `%XX`. Long messages keep their start (berth's reason) and are cut
/// at a char boundary.
pub fn percent_encode(message: &str) -> String {
    let mut cut = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut);
    for &byte in message[..cut].as_bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_follow_rfc7541_c1() {
        let mut b = Vec::new();
        integer(&mut b, 0, 5, 10);
        assert_eq!(b, [10]);
        b.clear();
        integer(&mut b, 0, 5, 1337);
        assert_eq!(b, [31, 154, 10]);
        b.clear();
        integer(&mut b, 0, 7, 127);
        assert_eq!(b, [127, 0]);
    }

    #[test]
    fn messages_are_percent_encoded_and_bounded() {
        assert_eq!(percent_encode("a 100% ü\n"), "a 100%25 %C3%BC%0A");
        let long = "é".repeat(5000);
        let enc = percent_encode(&long);
        assert!(enc.len() <= MAX_MESSAGE * 3 && enc.ends_with("%C3%A9"), "{}", enc.len());
        assert!(header_block(8, &long).len() + 9 < MAX_FRAME);
    }
}
