use std::net::Ipv4Addr;

use axum::response::IntoResponse;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

use super::*;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn limits(total: usize, per_source: usize) -> Limits {
    Limits {
        max_connections: total,
        max_connections_per_source: per_source,
        ..Limits::default()
    }
}

#[test]
fn one_source_is_held_to_its_share_and_all_to_the_total() {
    let limits = limits(5, 2);
    let mut table = ConnectionTable::default();
    assert_eq!(table.admit(ip(2), &limits), Ok(()));
    assert_eq!(table.admit(ip(2), &limits), Ok(()));
    assert_eq!(table.admit(ip(2), &limits), Err(Shed::PerSource));
    assert_eq!(table.held_by(ip(2)), 2, "a shed connection is not counted");
    assert_eq!(table.admit(ip(3), &limits), Ok(()));
    assert_eq!(table.admit(ip(3), &limits), Ok(()));
    assert_eq!(table.admit(ip(4), &limits), Ok(()));
    assert_eq!(table.admit(ip(5), &limits), Err(Shed::Total));
    // A source over its share is shed for that, whatever the others hold.
    assert_eq!(table.admit(ip(2), &limits), Err(Shed::PerSource));
    table.release(ip(2));
    assert_eq!(table.total(), 4);
    assert_eq!(table.admit(ip(5), &limits), Ok(()));
    for source in [2, 3, 3, 4, 5] {
        table.release(ip(source));
    }
    assert_eq!(table.total(), 0);
    assert!(
        table.by_source.is_empty(),
        "sources holding nothing leave the table"
    );
    table.release(ip(9));
    assert_eq!(
        table.total(),
        0,
        "releasing what was never admitted changes nothing"
    );
}

#[test]
fn the_table_gives_its_memory_back_after_a_flood_from_many_addresses() {
    let limits = limits(100_000, 1);
    let mut table = ConnectionTable::default();
    let sources: Vec<IpAddr> = (0..10_000u32)
        .map(|n| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)))
        .collect();
    for source in &sources {
        table.admit(*source, &limits).unwrap();
    }
    let peak = table.by_source.capacity();
    for source in &sources {
        table.release(*source);
    }
    assert!(
        table.by_source.capacity() < peak / 8,
        "{} of {peak}",
        table.by_source.capacity()
    );
}

#[test]
fn flags_give_limits_hyper_accepts() {
    let args = LimitArgs {
        max_connections: 0,
        max_connections_per_source: 0,
        header_read_timeout_sec: -1.0,
        max_request_bytes: 10,
    };
    let limits = args.limits();
    assert_eq!(limits.max_connections, 1);
    assert_eq!(limits.max_connections_per_source, 1);
    assert!(limits.header_read_timeout > Duration::ZERO);
    assert_eq!(limits.max_request_bytes, MIN_REQUEST_BYTES);
}

/// An endpoint serving `GET /` (answering the caller's address) within `limits`.
struct Endpoint {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    slow_started: Arc<tokio::sync::Notify>,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
}

async fn endpoint(limits: Limits) -> Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let slow_started = Arc::new(tokio::sync::Notify::new());
    // `/slow` answers after 300 ms; anything else answers the caller's address at once.
    let handler = {
        let started = slow_started.clone();
        move |request: Request<Incoming>, peer: SocketAddr, _: Arc<Connection>| {
            let started = started.clone();
            async move {
                if request.uri().path() == "/slow" {
                    started.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done".into_response()
                } else {
                    peer.ip().to_string().into_response()
                }
            }
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(listener, handler, limits, metrics.clone(), async move {
        let _ = stopped.await;
    }));
    Endpoint {
        addr,
        metrics,
        slow_started,
        stop,
        served,
    }
}

/// A connection from source address `from` (any of 127.0.0.0/8 is local).
async fn connect(addr: SocketAddr, from: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends one request on `stream` and reads one answer: (status, body).
async fn request(stream: &mut TcpStream, path: &str) -> (u16, String) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_answer(stream).await
}

async fn read_answer(stream: &mut TcpStream) -> (u16, String) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buffer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                return (status, format!("{head}\r\n\r\n{body}"));
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return (0, text),
            Ok(Ok(n)) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Whether the peer closed `stream` (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, stream.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn shed_count(metrics: &Metrics, reason: &'static str) -> u64 {
    metrics
        .connections_shed
        .get_or_create(&ReasonLabels { reason })
        .get()
}

#[tokio::test]
async fn one_source_cannot_take_more_than_its_share_and_others_are_still_served() {
    let e = endpoint(limits(100, 4)).await;
    // One pod opens idle keep-alive connections, each having made a request.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = connect(e.addr, ip(2)).await;
        assert_eq!(request(&mut stream, "/").await.0, 200);
        held.push(stream);
    }
    // Its next connection is shed with an answer SDKs retry.
    let mut over = connect(e.addr, ip(2)).await;
    let (status, answer) = request(&mut over, "/").await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(
        answer.contains("too many open connections from this address"),
        "{answer}"
    );
    assert!(closed_within(&mut over, Duration::from_secs(5)).await);
    assert_eq!(shed_count(&e.metrics, "per_source"), 1);
    // Another pod is served meanwhile, and sees its own address.
    let mut other = connect(e.addr, ip(3)).await;
    let (status, answer) = request(&mut other, "/").await;
    assert_eq!(status, 200);
    assert!(answer.ends_with("127.0.0.3"), "{answer}");
    assert_eq!(e.metrics.open_connections.get(), 5);
    // Once one of its connections closes, the first pod may open another.
    drop(held.pop());
    open_becomes(&e.metrics, 4).await;
    let mut again = connect(e.addr, ip(2)).await;
    assert_eq!(request(&mut again, "/").await.0, 200);
    let _ = e.stop.send(());
}

#[tokio::test]
async fn all_callers_together_are_held_to_the_total() {
    let e = endpoint(limits(3, 10)).await;
    let mut held = Vec::new();
    for source in [2, 3, 4] {
        let mut stream = connect(e.addr, ip(source)).await;
        assert_eq!(request(&mut stream, "/").await.0, 200);
        held.push(stream);
    }
    let mut over = connect(e.addr, ip(5)).await;
    let (status, answer) = request(&mut over, "/").await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.contains("too many open connections to the agent"),
        "{answer}"
    );
    assert_eq!(shed_count(&e.metrics, "total"), 1);
    assert_eq!(shed_count(&e.metrics, "per_source"), 0);
    let _ = e.stop.send(());
}

#[tokio::test]
async fn idle_and_trickling_connections_are_closed_after_the_header_read_timeout() {
    let e = endpoint(Limits {
        header_read_timeout: Duration::from_millis(300),
        ..limits(100, 100)
    })
    .await;
    // Idle keep-alive after a request.
    let mut idle = connect(e.addr, ip(2)).await;
    assert_eq!(request(&mut idle, "/").await.0, 200);
    // Never a byte.
    let mut silent = connect(e.addr, ip(2)).await;
    // Headers trickled in, never finished.
    let mut trickling = connect(e.addr, ip(2)).await;
    trickling
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    for stream in [&mut idle, &mut silent, &mut trickling] {
        assert!(closed_within(stream, Duration::from_secs(5)).await);
    }
    open_becomes(&e.metrics, 0).await;
    let _ = e.stop.send(());
}

#[tokio::test]
async fn the_header_read_timeout_counts_from_the_last_answer_and_never_cuts_one_short() {
    let timeout = Duration::from_millis(200);
    let e = endpoint(Limits {
        header_read_timeout: timeout,
        ..limits(100, 100)
    })
    .await;
    // Requests, each within the timeout of the last answer, for several timeouts in all.
    let mut busy = connect(e.addr, ip(2)).await;
    let started = tokio::time::Instant::now();
    while started.elapsed() < timeout * 4 {
        assert_eq!(request(&mut busy, "/").await.0, 200);
        tokio::time::sleep(timeout / 4).await;
    }
    // An answer that takes longer than the timeout (300 ms) is still sent.
    let (status, answer) = request(&mut busy, "/slow").await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with("done"));
    // Then idle: closed.
    assert!(closed_within(&mut busy, Duration::from_secs(5)).await);
    open_becomes(&e.metrics, 0).await;
    let _ = e.stop.send(());
}

#[tokio::test]
async fn a_request_head_over_the_limit_is_refused_and_the_connection_closed() {
    let e = endpoint(Limits {
        max_request_bytes: 8192,
        ..limits(100, 100)
    })
    .await;
    let mut stream = connect(e.addr, ip(2)).await;
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    // The server may close before reading all of it.
    let _ = stream.write_all(big.as_bytes()).await;
    let (status, _) = read_answer(&mut stream).await;
    assert!(status == 431 || status == 0, "{status}");
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await);
    // Too many headers.
    let mut stream = connect(e.addr, ip(2)).await;
    let mut many = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
    for n in 0..(MAX_HEADERS + 1) {
        many.push_str(&format!("x-{n}: v\r\n"));
    }
    many.push_str("\r\n");
    let _ = stream.write_all(many.as_bytes()).await;
    let (status, _) = read_answer(&mut stream).await;
    assert!(status == 431 || status == 0, "{status}");
    open_becomes(&e.metrics, 0).await;
    let _ = e.stop.send(());
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_and_closes_idle_connections() {
    let e = endpoint(limits(100, 100)).await;
    let mut idle = connect(e.addr, ip(2)).await;
    assert_eq!(request(&mut idle, "/").await.0, 200);
    let mut busy = connect(e.addr, ip(3)).await;
    busy.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    e.slow_started.notified().await;
    let _ = e.stop.send(());
    let (status, answer) = read_answer(&mut busy).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with("done"));
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    tokio::time::timeout(Duration::from_secs(5), e.served)
        .await
        .unwrap()
        .unwrap();
}

/// Waits until the open-connections gauge reads `open` (a connection's task ends shortly after its
/// socket closes).
async fn open_becomes(metrics: &Metrics, open: i64) {
    pod_identity_test_support::eventually(|| async {
        let now = metrics.open_connections.get();
        if now == open {
            Ok(())
        } else {
            Err(format!("{now} connections open, waiting for {open}"))
        }
    })
    .await
    .unwrap();
}
