//! Shared fixtures: a server on a free loopback port with its own state directory.
#![allow(dead_code)]

use std::path::PathBuf;

use lab_apiserver::{Config, Options, Server};

pub struct Lab {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

pub async fn start(opts: Options) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, opts).await
}

pub async fn start_in(dir: tempfile::TempDir, opts: Options) -> Lab {
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: dir.path().join("state"),
        token: None,
        extra_sans: vec!["10.102.123.117".into(), "apiserver.lab".into()],
    };
    let server = Server::start_with(cfg, opts).await.unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, None).unwrap();
    Lab {
        server,
        dir,
        kubeconfig,
    }
}

/// A kube-rs client configured from the written kubeconfig, as a lab component would build it.
pub async fn client(lab: &Lab) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(&lab.kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}
