//! A gRPC connection that records when the first byte from the daemon
//! arrived ([`Conn`]), and the samples taken with it.

use super::*;

/// Records when the first bytes were read from the wrapped stream.
pub(crate) struct FirstByte {
    pub(crate) inner: UnixStream,
    pub(crate) first: Arc<OnceLock<Instant>>,
}

impl AsyncRead for FirstByte {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.first.get_or_init(Instant::now);
        }
        r
    }
}

impl AsyncWrite for FirstByte {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One HTTP/2 connection over a unix socket that knows when its first byte
/// arrived and can be shut down at once (both directions, so the peer sees
/// the close immediately, whatever the runtime does with the channel).
pub struct Conn {
    pub ch: Channel,
    pub(crate) first: Arc<OnceLock<Instant>>,
    pub(crate) fd: Arc<Mutex<Option<OwnedFd>>>,
}

impl Conn {
    pub async fn open(socket: &Path) -> Result<Conn> {
        let first = Arc::new(OnceLock::new());
        let fd: Arc<Mutex<Option<OwnedFd>>> = Arc::new(Mutex::new(None));
        let (f2, fd2, path) = (first.clone(), fd.clone(), socket.to_path_buf());
        let ch = Endpoint::from_static("http://bench.invalid")
            .connect_timeout(CALL_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let (first, fd, path) = (f2.clone(), fd2.clone(), path.clone());
                async move {
                    let s = UnixStream::connect(&path).await?;
                    *fd.lock().unwrap() = Some(s.as_fd().try_clone_to_owned()?);
                    Ok::<_, io::Error>(TokioIo::new(FirstByte { inner: s, first }))
                }
            }))
            .await
            .map_err(|e| anyhow!("connect {}: {}", socket.display(), crate::grpc::error_chain(&e)))?;
        Ok(Conn { ch, first, fd })
    }

    pub fn fake(&self) -> FakeClient<Channel> {
        FakeClient::new(self.ch.clone())
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE)
            .max_encoding_message_size(crate::grpc::MAX_MESSAGE)
    }

    pub fn first_byte(&self) -> Option<Instant> {
        self.first.get().copied()
    }

    pub async fn ping(&self) -> Result<PingReply> {
        match tokio::time::timeout(CALL_TIMEOUT, self.fake().ping(PingRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => bail!("Ping: {:?}: {}", s.code(), s.message()),
            Err(_) => bail!("Ping: no reply within {CALL_TIMEOUT:?}"),
        }
    }

    /// Shuts the socket down both ways now, then drops the channel.
    pub fn close(self) {
        if let Some(fd) = self.fd.lock().unwrap().take() {
            let _ = nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&fd), nix::sys::socket::Shutdown::Both);
        }
    }
}

/// One start: connect (or spawn, for a direct daemon) to the first byte
/// from the daemon, and to the Ping reply.
#[derive(Debug, Clone, Copy)]
pub struct StartSample {
    pub first_byte_ms: f64,
    pub call_ms: f64,
    /// When the daemon's socket was bound (direct: its "serving on" line;
    /// berth: the socket file's inotify event), when known.
    pub bound_ms: Option<f64>,
}

/// Connects to `socket` (clock started at `t0`) and calls Fake.Ping.
pub async fn timed_ping(socket: &Path, t0: Instant) -> Result<(StartSample, PingReply, Conn)> {
    let conn = Conn::open(socket).await?;
    let reply = conn.ping().await?;
    let done = Instant::now();
    let fb = conn.first_byte().unwrap_or(done);
    let s = StartSample {
        first_byte_ms: fb.duration_since(t0).as_secs_f64() * 1e3,
        call_ms: done.duration_since(t0).as_secs_f64() * 1e3,
        bound_ms: None,
    };
    Ok((s, reply, conn))
}
