//! Plain HTTP/1.1 to the Instance Metadata Service, on connections that can carry a socket mark.
//!
//! A node agent that intercepts host traffic to `169.254.169.254:80` (callers on the node's own network go
//! through netfilter's `OUTPUT` hook) must not intercept its own calls to IMDS. Netfilter tells them apart by
//! the socket mark (`SO_MARK`): setting one takes `CAP_NET_ADMIN`, which no ordinary pod has, whereas a
//! source address or port could be chosen by any process of the node. The mark must be on the socket before
//! its first packet (the `SYN` decides the connection's NAT), so the socket is made here, not by a general
//! HTTP client (reqwest has no such option: seanmonstar/reqwest#2809).
//!
//! IMDS is plain HTTP on a link-local address and refuses proxied requests, so this client has no TLS and no
//! proxy; answers are read whole, up to a bound.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::{TcpSocket, TcpStream};

use crate::error::AzureError;

/// Largest answer read, in bytes: IMDS documents and tokens are a few kilobytes.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// An HTTP/1.1 client for IMDS. Cloning shares its connection pool.
#[derive(Clone, Debug)]
pub struct ImdsHttp {
    client: Client<MarkedConnector, Full<Bytes>>,
    timeout: Duration,
    mark: Option<u32>,
}

impl ImdsHttp {
    /// A client whose requests (connection included) end after `timeout`, whose connections are made within
    /// `connect_timeout`, and whose sockets carry `mark` (`SO_MARK`, Linux only; needs `CAP_NET_ADMIN`).
    pub fn new(timeout: Duration, connect_timeout: Duration, mark: Option<u32>) -> Self {
        let connector = MarkedConnector {
            mark,
            connect_timeout,
        };
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            timeout,
            mark,
        }
    }

    /// The socket mark of this client's connections.
    pub fn mark(&self) -> Option<u32> {
        self.mark
    }

    /// `GET uri` with `headers`; the answer's status, headers and body.
    ///
    /// Errors: [`AzureError::Transient`] with code `Timeout` when the request outlasted the timeout,
    /// `Transport` when no connection could be made or the exchange broke, and
    /// [`AzureError::InvalidResponse`] for an answer longer than [`MAX_ANSWER_BYTES`].
    pub async fn get(&self, uri: Uri, headers: HeaderMap) -> Result<Response<Bytes>, AzureError> {
        let mut request = Request::get(uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| AzureError::Config(format!("an IMDS request: {e}")))?;
        *request.headers_mut() = headers;
        let exchange = async {
            let answer = self.client.request(request).await.map_err(|e| transport(&e))?;
            let (parts, body) = answer.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        AzureError::InvalidResponse(format!(
                            "the IMDS answer is longer than {MAX_ANSWER_BYTES} bytes"
                        ))
                    } else {
                        transport(e.as_ref())
                    }
                })?
                .to_bytes();
            Ok(Response::from_parts(parts, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(AzureError::Transient {
                status: None,
                code: "Timeout".into(),
                message: format!("IMDS did not answer within {:?}", self.timeout),
            }),
        }
    }
}

fn transport(e: &(dyn std::error::Error + 'static)) -> AzureError {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    AzureError::Transient {
        status: None,
        code: "Transport".into(),
        message,
    }
}

/// Makes TCP connections whose sockets carry a mark before they connect.
#[derive(Clone, Debug)]
pub struct MarkedConnector {
    mark: Option<u32>,
    connect_timeout: Duration,
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mark = self.mark;
        let connect_timeout = self.connect_timeout;
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in the IMDS address"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(80);
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
            for address in tokio::net::lookup_host((host, port)).await? {
                match tokio::time::timeout(connect_timeout, connect(address, mark)).await {
                    Ok(Ok(stream)) => return Ok(TokioIo::new(stream)),
                    Ok(Err(error)) => last = error,
                    Err(_) => {
                        last = io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("connecting to {address} took longer than {connect_timeout:?}"),
                        )
                    }
                }
            }
            Err(last)
        })
    }
}

async fn connect(address: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        set_mark(&socket, mark)?;
    }
    let stream = socket.connect(address).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_mark(socket: &TcpSocket, mark: u32) -> io::Result<()> {
    socket2::SockRef::from(socket).set_mark(mark).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("setting socket mark {mark:#x} (needs CAP_NET_ADMIN): {e}"),
        )
    })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_mark(_: &TcpSocket, mark: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!("socket mark {mark:#x}: socket marks exist on Linux only"),
    ))
}
