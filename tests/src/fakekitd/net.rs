//! fakekitd's network probes: what a RUN step that downloads something,
//! serves a port or resolves a name would see from the daemon's network
//! namespace.

use crate::proto::fake::{BindReply, ConnectReply, ConnectRequest, ResolveReply};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The source address of a probe: parsed, and added (/32) to `eth0` unless
/// it is local already (binding to it works then).
async fn source_addr(source: &str) -> Result<Option<std::net::Ipv4Addr>, String> {
    if source.is_empty() {
        return Ok(None);
    }
    let a: std::net::Ipv4Addr = source.parse().map_err(|e| format!("{e}"))?;
    if std::net::UdpSocket::bind((a, 0)).is_ok() {
        return Ok(Some(a));
    }
    let h = berth_shim::net::connect().map_err(|e| e.to_string())?;
    let idx = berth_shim::net::index_of(&h, berth_shim::net::INNER_IF)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no eth0 in this network namespace")?;
    h.address().add(idx, a.into(), 32).execute().await.map_err(|e| format!("add {a}/32 to eth0: {e}"))?;
    Ok(Some(a))
}

/// Most bytes of an answer kept.
const MAX_RECEIVED: usize = 64 * 1024;

pub async fn connect(r: ConnectRequest) -> ConnectReply {
    let mut out = ConnectReply::default();
    let addr: SocketAddr = match r.address.parse() {
        Ok(a) => a,
        Err(e) => {
            out.result = "error".into();
            out.error = format!("{:?}: {e}", r.address);
            return out;
        }
    };
    let limit = Duration::from_millis(if r.timeout_ms == 0 { 5000 } else { r.timeout_ms as u64 });
    let source = match source_addr(&r.source).await {
        Ok(s) => s,
        Err(e) => {
            out.result = "error".into();
            out.error = format!("source {:?}: {e}", r.source);
            return out;
        }
    };
    let started = Instant::now();
    let conn = tokio::time::timeout(limit, async {
        let Some(src) = source else { return TcpStream::connect(addr).await };
        let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        sock.bind(SocketAddr::new(src.into(), 0))?;
        sock.connect(addr).await
    })
    .await;
    out.connect_ms = started.elapsed().as_millis() as u32;
    let mut stream = match conn {
        Err(_) => {
            out.result = "timeout".into();
            return out;
        }
        Ok(Err(e)) => {
            out.result = match e.kind() {
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable => "refused",
                _ if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EPERM) => "refused",
                _ => "error",
            }
            .into();
            out.error = e.to_string();
            return out;
        }
        Ok(Ok(s)) => s,
    };
    out.result = "ok".into();
    if !r.send.is_empty() {
        if let Err(e) = stream.write_all(&r.send).await {
            out.error = format!("write: {e}");
            return out;
        }
    }
    if r.discard {
        let t = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(k) => out.received_bytes += k as u64,
                Err(e) => {
                    out.error = format!("read: {e}");
                    break;
                }
            }
        }
        out.transfer_ms = t.elapsed().as_millis() as u32;
        return out;
    }
    let mut buf = vec![0u8; MAX_RECEIVED];
    let mut n = 0;
    while n < buf.len() {
        match tokio::time::timeout(limit, stream.read(&mut buf[n..])).await {
            Ok(Ok(0)) => break,
            Ok(Ok(k)) => n += k,
            Ok(Err(e)) => {
                out.error = format!("read: {e}");
                break;
            }
            Err(_) => break,
        }
    }
    buf.truncate(n);
    out.received_bytes = n as u64;
    out.received = buf;
    out
}

pub async fn bind(port: u32, hold_ms: u32) -> BindReply {
    let mut out = BindReply::default();
    let res = async {
        let l = TcpListener::bind(("0.0.0.0", port as u16)).await?;
        let addr = l.local_addr()?;
        let (c, a) = tokio::join!(TcpStream::connect(("127.0.0.1", addr.port())), l.accept());
        c?;
        a?;
        io::Result::Ok((addr, l))
    }
    .await;
    match res {
        Ok((a, l)) => {
            out.address = a.to_string();
            if hold_ms > 0 {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_millis(hold_ms as u64), async {
                        while let Ok((mut c, _)) = l.accept().await {
                            let _ = c.write_all(b"bound\n").await;
                        }
                    })
                    .await;
                });
            }
        }
        Err(e) => out.error = e.to_string(),
    }
    out
}

pub async fn resolve(name: &str) -> ResolveReply {
    let mut out = ResolveReply::default();
    match tokio::net::lookup_host((name, 0)).await {
        Ok(addrs) => out.addresses = addrs.map(|a| a.ip().to_string()).collect(),
        Err(e) => out.error = e.to_string(),
    }
    out
}
