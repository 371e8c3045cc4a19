//! A TCP proxy that can cut a client off from etcd without touching either side: faults for
//! chaos tests that no signal can produce (a network partition of one process).
//!
//! In [`ProxyMode::Pass`] bytes flow. In [`ProxyMode::Stall`] nothing is forwarded in either
//! direction and new connections hang, like a black-holed network: requests already sent sit
//! in buffers and arrive late when the mode returns to `Pass` (which is how a stale commit
//! reaches etcd after its lease expired). [`ProxyMode::Refuse`] closes every connection and
//! refuses new ones.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::HarnessError;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward everything.
    Pass,
    /// Forward nothing and hold connections open (a black hole).
    Stall,
    /// Hold what the client sends but deliver what the server sends: the client's requests
    /// (lease renewals, commits) queue up and reach etcd only when the mode returns to `Pass`,
    /// while it still hears the server. The surest way to make a commit arrive after its lease
    /// expired.
    StallRequests,
    /// Close connections and refuse new ones.
    Refuse,
}

/// A running proxy to one upstream address; stops when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<TcpProxy, HarnessError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(crate::io("binding the proxy"))?;
        let addr = listener.local_addr().map_err(crate::io("proxy address"))?;
        let (mode, watcher) = watch::channel(ProxyMode::Pass);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if *watcher.borrow() == ProxyMode::Refuse {
                    drop(client);
                    continue;
                }
                tokio::spawn(pipe(client, upstream, watcher.clone()));
            }
        });
        Ok(TcpProxy { addr, mode, task })
    }

    /// `127.0.0.1:port` to give clients instead of the upstream.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Switches the mode for every connection, present and future.
    pub fn set(&self, mode: ProxyMode) {
        let _ = self.mode.send(mode);
    }
}

/// Waits until traffic may flow in this direction; false if the connection must close.
async fn may_flow(mode: &mut watch::Receiver<ProxyMode>, upstream: bool) -> bool {
    loop {
        let now = *mode.borrow_and_update();
        match now {
            ProxyMode::Pass => return true,
            ProxyMode::StallRequests if !upstream => return true,
            ProxyMode::Refuse => return false,
            ProxyMode::Stall | ProxyMode::StallRequests => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn pipe(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<ProxyMode>) {
    if !may_flow(&mut mode, true).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = tokio::spawn(copy(client_read, server_write, mode.clone(), true));
    let down = tokio::spawn(copy(server_read, client_write, mode, false));
    let _ = tokio::join!(up, down);
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
    upstream: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Reading is also held while stalled, so the sender's buffers fill as on a dead link.
        if !may_flow(&mut mode, upstream).await {
            return;
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => n,
            _ = mode.changed() => continue,
        };
        let n = match n {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !may_flow(&mut mode, upstream).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_stalls_and_refuses() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = TcpProxy::start(echo_addr).await.expect("proxy");
        let mut conn = TcpStream::connect(proxy.endpoint()).await.expect("connect");
        let mut buf = [0u8; 4];
        conn.write_all(b"ping").await.expect("write");
        conn.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"ping");

        proxy.set(ProxyMode::Stall);
        conn.write_all(b"late").await.expect("write");
        let stalled = tokio::time::timeout(Duration::from_millis(300), conn.read_exact(&mut buf)).await;
        assert!(stalled.is_err(), "nothing flows while stalled");
        proxy.set(ProxyMode::Pass);
        conn.read_exact(&mut buf).await.expect("held bytes arrive");
        assert_eq!(&buf, b"late");

        proxy.set(ProxyMode::StallRequests);
        conn.write_all(b"held").await.expect("write");
        let stalled = tokio::time::timeout(Duration::from_millis(300), conn.read_exact(&mut buf)).await;
        assert!(stalled.is_err(), "requests are held");
        proxy.set(ProxyMode::Pass);
        conn.read_exact(&mut buf).await.expect("held request delivered");
        assert_eq!(&buf, b"held");

        proxy.set(ProxyMode::Refuse);
        let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
            .await
            .expect("closed promptly")
            .unwrap_or(0);
        assert_eq!(n, 0, "connection closed");
    }
}
