//! The end of a run: SIGTERM (what the kubelet sends to a container it stops) or SIGINT (Ctrl-C).

/// Resolves at the first SIGTERM or SIGINT. If SIGTERM cannot be listened for, only SIGINT ends it (and
/// the error is logged).
pub async fn signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
