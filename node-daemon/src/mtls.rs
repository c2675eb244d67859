//! Mutual TLS with the network node, as upstream sets it up (gonka-ai/gonka `deploy/join/MTLS.md`,
//! `gen-mlnode-certs.sh`): two self-signed certificates that pin each other, `mlnode.crt` /
//! `mlnode.key` for the ML node and `dapi.crt` for the network node, read from the files
//! upstream's ML node is given (`MLNODE_MTLS_CLIENT_CERT`, `MLNODE_MTLS_CLIENT_KEY`,
//! `MLNODE_MTLS_SERVER_CA`).
//!
//! - The ML-node API and the inference port ([`ApiListener`]) take only a client that presents exactly the
//!   pinned `dapi.crt` and proves its key in the handshake: no certificate, another one, or one
//!   merely issued by it fails the handshake, before any request is read.
//! - They serve a certificate the network node checks as upstream's client does (`mlnode.crt`
//!   its only root, the address it registered — the pod IP — among the names). A pod's IP is not
//!   known when the pair is made, so when `mlnode.crt` is a CA (upstream's script makes it one)
//!   the daemon issues itself, at start and in memory only, a certificate under it for its own
//!   addresses and `mlnode.crt`'s names; otherwise it serves `mlnode.crt` as it is.
//! - Callbacks present `mlnode.crt` and trust exactly `dapi.crt`.
//!
//! Both of upstream's certificates are CAs, which WebPKI refuses as an end entity; hence the
//! pinning verifiers here: the byte-equal certificate, its handshake signature checked with its
//! key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

/// Where the pair is (upstream's ML-node environment names in brackets).
#[derive(Clone, Debug)]
pub struct MtlsFiles {
    /// This ML node's certificate, `mlnode.crt` (`MLNODE_MTLS_CLIENT_CERT`).
    pub cert: PathBuf,
    /// Its key, `mlnode.key` (`MLNODE_MTLS_CLIENT_KEY`).
    pub key: PathBuf,
    /// The network node's certificate, pinned, `dapi.crt` (`MLNODE_MTLS_SERVER_CA`).
    pub peer_cert: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The loaded pair, ready for the servers and the callback client.
pub struct Mtls {
    /// `mlnode.crt` and its key: presented on callbacks.
    own: (CertificateDer<'static>, Arc<PrivateKeyDer<'static>>),
    /// What the ML-node API and inference port serve: a certificate issued for this pod under
    /// `mlnode.crt` followed by it, or `mlnode.crt` alone.
    serving: (Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>),
    /// `dapi.crt`.
    peer: Arc<Pinned>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Mtls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mtls").field("serving_chain", &self.serving.0.len()).finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, MtlsError> {
    std::fs::read(path).map_err(|e| MtlsError::Read { path: path.display().to_string(), message: e.to_string() })
}

fn invalid(path: &Path, message: impl Into<String>) -> MtlsError {
    MtlsError::Invalid { path: path.display().to_string(), message: message.into() }
}

fn first_certificate(path: &Path) -> Result<CertificateDer<'static>, MtlsError> {
    let pem = read(path)?;
    CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| invalid(path, "no PEM certificate in it"))?
        .map_err(|e| invalid(path, format!("not a PEM certificate: {e}")))
}

impl Mtls {
    /// Reads the pair; `addresses` are this ML node's own (pod IP, listen address), put in the
    /// serving certificate it issues itself.
    pub fn load(files: &MtlsFiles, addresses: &[IpAddr]) -> Result<Self, MtlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let own_cert = first_certificate(&files.cert)?;
        let key_pem = read(&files.key)?;
        let own_key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| invalid(&files.key, format!("no PEM private key in it: {e}")))?;
        // The key must be the certificate's (a mixed-up pair fails here, not at the first call).
        let signer = provider.key_provider.load_private_key(own_key.clone_key())?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&own_cert)
            .map_err(|e| invalid(&files.cert, format!("not an X.509 certificate: {e}")))?;
        if signer.public_key().is_some_and(|spki| spki.as_ref() != parsed.public_key().raw) {
            return Err(invalid(&files.key, format!("not the key of {}", files.cert.display())));
        }
        let peer = first_certificate(&files.peer_cert)?;
        x509_parser::parse_x509_certificate(&peer)
            .map_err(|e| invalid(&files.peer_cert, format!("not an X.509 certificate: {e}")))?;
        let own_key = Arc::new(own_key);
        let serving = match issue_serving(&own_cert, &key_pem, addresses) {
            Ok(Some((leaf, key))) => (vec![leaf, own_cert.clone()], Arc::new(key)),
            Ok(None) => (vec![own_cert.clone()], own_key.clone()),
            Err(e) => {
                tracing::warn!(error = %e, "serving mlnode.crt as it is: no certificate could be issued under it");
                (vec![own_cert.clone()], own_key.clone())
            }
        };
        let peer = Arc::new(Pinned { certificate: peer, algorithms: provider.signature_verification_algorithms });
        Ok(Self { own: (own_cert, own_key), serving, peer, provider })
    }

    /// For the ML-node API and the inference port.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, MtlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(self.peer.clone())
            .with_single_cert(self.serving.0.clone(), self.serving.1.clone_key())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// For callbacks to the network node.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, MtlsError> {
        Ok(rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(self.peer.clone())
            .with_client_auth_cert(vec![self.own.0.clone()], self.own.1.clone_key())?)
    }

    /// The certificates the servers present, leaf first (tests, logs).
    pub fn serving_chain(&self) -> &[CertificateDer<'static>] {
        &self.serving.0
    }
}

/// A certificate under `ca` for `addresses` and the names `ca` carries, with a fresh key; `None`
/// when `ca` is no CA that may sign certificates.
fn issue_serving(
    ca: &CertificateDer<'static>,
    ca_key_pem: &[u8],
    addresses: &[IpAddr],
) -> Result<Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>, String> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(ca).map_err(|e| e.to_string())?;
    let signs = parsed.key_usage().ok().flatten().is_none_or(|u| u.value.key_cert_sign());
    if !parsed.is_ca() || !signs {
        return Ok(None);
    }
    let mut names: Vec<SanType> = addresses.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            let extra = match name {
                GeneralName::DNSName(dns) => (*dns).try_into().ok().map(SanType::DnsName),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => Some(SanType::IpAddress(IpAddr::from(<[u8; 4]>::try_from(*bytes).expect("4 bytes")))),
                    16 => Some(SanType::IpAddress(IpAddr::from(<[u8; 16]>::try_from(*bytes).expect("16 bytes")))),
                    _ => None,
                },
                _ => None,
            };
            if let Some(extra) = extra
                && !names.contains(&extra)
            {
                names.push(extra);
            }
        }
    }
    let ca_key = std::str::from_utf8(ca_key_pem).map_err(|e| e.to_string())?;
    let ca_key = KeyPair::from_pem(ca_key).map_err(|e| format!("mlnode.key: {e} (a PKCS#8 key is needed)"))?;
    let issuer = rcgen::Issuer::from_ca_cert_der(ca, ca_key).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "gonka-mlnode (issued by the ML node for itself)");
    params.subject_alt_names = names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    // rcgen's default validity (to 4096), as upstream's pair's 100 years: nothing expires while
    // the pod runs, and the key exists only in this process.
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let leaf = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok(Some((leaf.der().clone(), key)))
}

/// Trusts exactly one certificate, as peer or as server, whatever its extensions say.
#[derive(Debug)]
struct Pinned {
    certificate: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// rustls' TLS 1.2 or 1.3 handshake-signature check.
type SignatureCheck = fn(
    &[u8],
    &CertificateDer<'_>,
    &DigitallySignedStruct,
    &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error>;

impl Pinned {
    /// The handshake signature, checked with the presented certificate's key (the same for
    /// either side: the certificate itself was compared with the pinned one).
    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
        check: SignatureCheck,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check(message, cert, dss, &self.algorithms)
    }

    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.certificate.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }
}

impl ClientCertVerifier for Pinned {
    /// No hints: Go's client then sends its one certificate (with hints it would send none
    /// whose issuer is not named).
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss, rustls::crypto::verify_tls12_signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss, rustls::crypto::verify_tls13_signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss, rustls::crypto::verify_tls12_signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss, rustls::crypto::verify_tls13_signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Handshakes under way at most: more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 64;
/// Longest a handshake may take (a client that connects and says nothing holds a slot no longer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener for `axum::serve` that speaks TLS when given a configuration, plain TCP otherwise:
/// one serve path for both. Handshakes run beside each other (bounded, with a timeout), so one
/// stalled client does not hold up the others, and only finished handshakes are served.
pub struct ApiListener {
    kind: ListenerKind,
    local: SocketAddr,
}

enum ListenerKind {
    Plain(TcpListener),
    Tls {
        ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        acceptor: tokio::task::JoinHandle<()>,
    },
}

impl ApiListener {
    pub fn new(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let Some(config) = tls else { return Ok(Self { kind: ListenerKind::Plain(listener), local }) };
        let (tx, ready) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
        let tls = tokio_rustls::TlsAcceptor::from(config);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: wait, as axum's own listener does.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { kind: ListenerKind::Tls { ready, acceptor }, local })
    }
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        if let ListenerKind::Tls { acceptor, .. } = &self.kind {
            acceptor.abort();
        }
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = Either<TcpStream, TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match &mut self.kind {
            ListenerKind::Plain(listener) => {
                let (stream, peer) = axum::serve::Listener::accept(listener).await;
                (Either::Left(stream), peer)
            }
            ListenerKind::Tls { ready, .. } => match ready.recv().await {
                Some((stream, peer)) => (Either::Right(stream), peer),
                // The acceptor is gone only when the listener is dropped.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
