//! `kubectl podidentity`: see [`pod_identity_cli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // An error only means a provider is installed already.
    let _ = pod_identity_runtime::install_crypto_provider();
    let args = <pod_identity_cli::Args as clap::Parser>::parse();
    match pod_identity_cli::run(args, &mut std::io::stdout()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
