//! The devnet over https: a throwaway CA issues a certificate for 127.0.0.1, so tests of TLS
//! clients (the operator's admin-API client, the ML nodes' callbacks) meet a real handshake.

use std::sync::Arc;

use axum::Router;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio_rustls::rustls;

/// A throwaway certificate authority for tests (the devnet's https, the e2e apiserver).
pub struct TestCa {
    /// The CA's certificate, PEM: what a client trusts.
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key)?.pem();
        Ok(Self { pem, issuer: Issuer::new(params, key) })
    }

    /// A serving certificate for `hosts` (names or IP addresses) and its key.
    pub fn issue(&self, hosts: &[&str], name: &str) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, name);
        Ok((params.signed_by(&key, &self.issuer)?, key))
    }
}

/// Serves `app` over https on a free loopback port until the runtime ends; returns its base URL
/// (`https://127.0.0.1:<port>`) and the CA's certificate (PEM) a client must trust.
pub async fn serve_https(app: Router) -> anyhow::Result<(String, String)> {
    let ca = TestCa::new("gonka-devnet-test-ca")?;
    let (cert, key) = ca.issue(&["127.0.0.1"], "gonka-devnet")?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key.serialize_der().try_into().map_err(anyhow::Error::msg)?)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok((url, ca.pem))
}
