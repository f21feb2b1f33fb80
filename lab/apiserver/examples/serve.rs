//! Runs the API stand-in by hand: `cargo run -p lab-apiserver --example serve -- STATE_DIR [ADDR]`,
//! then `KUBECONFIG=STATE_DIR/kubeconfig kubectl get ns`. Ctrl-C saves and stops.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let state_dir: std::path::PathBuf = args.next().unwrap_or_else(|| "/tmp/lab-apiserver".into()).into();
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:0".into()).parse()?;
    let cfg = lab_apiserver::Config {
        listen,
        state_dir: state_dir.clone(),
        token: None,
        extra_sans: vec![],
    };
    let server = lab_apiserver::Server::start(cfg).await?;
    let kubeconfig = state_dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, None)?;
    println!("serving {} ; export KUBECONFIG={}", server.url(), kubeconfig.display());
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}
