//! TLS for the Riemann TCP protocol: a rustls server configuration (ring
//! provider) loaded from PEM files, optionally requiring client certificates
//! signed by a given CA. The handshake itself runs in [`tcp`](crate::tcp),
//! which serves plain and TLS connections with the same handler. And the
//! client side ([`ClientTls`]), for a `forward` output to a TLS port.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::VerifierBuilderError;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::files;

/// Riemann's TLS port.
pub const DEFAULT_ADDR: &str = "127.0.0.1:5554";

/// Where the TLS listener binds, and how it handshakes.
#[derive(Clone)]
pub struct TlsListener {
    pub addr: SocketAddr,
    pub acceptor: Arc<Acceptor>,
}

/// The listener's TLS configuration, read again from its files on demand
/// (`SIGHUP`): connections accepted from then on handshake with the renewed
/// certificate, those open keep theirs. Files that do not load leave the
/// configuration in use.
pub struct Acceptor {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    current: ArcSwap<TlsAcceptor>,
}

impl Acceptor {
    /// See [`acceptor`].
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Acceptor, TlsError> {
        Ok(Acceptor {
            current: ArcSwap::from_pointee(acceptor(cert, key, client_ca)?),
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        })
    }

    /// What a connection accepted now handshakes with.
    pub fn current(&self) -> Arc<TlsAcceptor> {
        self.current.load_full()
    }

    /// Reads the files again and, if they load, uses them from now on.
    pub fn reload(&self) -> Result<(), TlsError> {
        let renewed = acceptor(&self.cert, &self.key, self.client_ca.as_deref())?;
        self.current.store(Arc::new(renewed));
        Ok(())
    }

    /// The certificate file, as logged.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Why the TLS listener could not be set up; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the TLS key from {}: {cause}", .path.display())]
    Key {
        path: PathBuf,
        cause: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("reading certificates from {}: {cause}", .path.display())]
    Certificates {
        path: PathBuf,
        cause: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate found", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: not a usable CA certificate: {cause}", .path.display())]
    CaCertificate {
        path: PathBuf,
        cause: tokio_rustls::rustls::Error,
    },
    #[error("using {} as the client CA: {cause}", .path.display())]
    ClientCa {
        path: PathBuf,
        cause: VerifierBuilderError,
    },
    #[error("choosing TLS versions: {0}")]
    Versions(tokio_rustls::rustls::Error),
    #[error("{}: not the private key of the certificate in {}", .key.display(), .cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: not a usable certificate: {cause}", .path.display())]
    Certificate {
        path: PathBuf,
        cause: tokio_rustls::rustls::Error,
    },
    #[error("`{0}` is not a name or address a certificate can be checked against")]
    ServerName(String),
    #[error("{}: {cause}", .path.display())]
    File {
        path: PathBuf,
        cause: files::ReadError,
    },
}

impl TlsError {
    /// The file at fault, if one is.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Key { path, .. }
            | TlsError::Certificates { path, .. }
            | TlsError::CaCertificate { path, .. }
            | TlsError::ClientCa { path, .. }
            | TlsError::Certificate { path, .. }
            | TlsError::File { path, .. }
            | TlsError::Mismatch { key: path, .. }
            | TlsError::NoCertificate(path) => Some(path),
            TlsError::Versions(_) | TlsError::ServerName(_) => None,
        }
    }
}

/// How a client connects over TLS: the server name its certificate must
/// carry, the CAs it must chain to, and the client's own certificate if it
/// presents one (a vigil started with `--tls-ca` requires it).
#[derive(Clone)]
pub struct ClientTls {
    server_name: ServerName<'static>,
    connector: TlsConnector,
    /// The files' contents as read: two are equal when they were, so a
    /// reload after a certificate was renewed starts the output anew.
    cas: Vec<CertificateDer<'static>>,
    identity: Option<Identity>,
}

/// A client certificate chain and its key (PEM), as read.
#[derive(Clone, PartialEq)]
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key_pem: Vec<u8>,
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        (&self.server_name, &self.cas, &self.identity)
            == (&other.server_name, &other.cas, &other.identity)
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the key.
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusting the CA certificates in the PEM file `ca`, checking the
    /// server's certificate for `server_name`, presenting `identity` (a
    /// certificate chain and its key, PEM) if given.
    pub fn load(
        server_name: &str,
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, TlsError> {
        let checked = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        let provider = Arc::new(ring::default_provider());
        let cas = certificates(ca)?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Versions)?
            .with_root_certificates(roots(ca, &cas)?);
        let (config, identity) = match identity {
            None => (builder.with_no_client_auth(), None),
            Some((cert, key_path)) => {
                let chain = certificates(cert)?;
                let key_pem = read_key(key_path)?;
                let key = parse_key(key_path, &key_pem)?;
                let config = builder.with_client_auth_cert(chain.clone(), key).map_err(
                    |cause| match cause {
                        tokio_rustls::rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                            cert: cert.to_owned(),
                            key: key_path.to_owned(),
                        },
                        cause => TlsError::Certificate {
                            path: cert.to_owned(),
                            cause,
                        },
                    },
                )?;
                (config, Some(Identity { chain, key_pem }))
            }
        };
        Ok(ClientTls {
            server_name: checked,
            connector: TlsConnector::from(Arc::new(config)),
            cas,
            identity,
        })
    }

    /// The handshake over `socket`.
    pub async fn connect<S>(&self, socket: S) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.connector
            .connect(self.server_name.clone(), socket)
            .await
    }
}

/// The server's certificate chain and key (PEM); with `client_ca`, clients
/// must present a certificate that chains to a certificate in that PEM file.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, TlsError> {
    // Explicit, so a second provider linked in later cannot make this ambiguous.
    let provider = Arc::new(ring::default_provider());
    let chain = certificates(cert)?;
    let key_path = key;
    let key = parse_key(key_path, &read_key(key_path)?)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca, &certificates(ca)?)?),
                provider,
            )
            .build()
            .map_err(|cause| TlsError::ClientCa {
                path: ca.to_owned(),
                cause,
            })?,
        ),
    };
    if let Some(problem) = out_of_date(&chain[0], SystemTime::now()) {
        // Started anyway, as web servers do, but said: every client that
        // checks the dates will refuse the handshake.
        tracing::warn!(
            certificate = %cert.display(),
            %problem,
            "The TLS certificate is out of date: clients that check it will refuse every handshake."
        );
    }
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|cause| match cause {
            tokio_rustls::rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                cert: cert.to_owned(),
                key: key_path.to_owned(),
            },
            // Not the key's fault: e.g. an X.509 v1 certificate, which
            // `openssl x509 -req` makes without an extensions file.
            cause => TlsError::Certificate {
                path: cert.to_owned(),
                cause,
            },
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Why `cert` is not valid at `now`, if it is not: expired or not yet valid.
fn out_of_date(cert: &CertificateDer<'_>, now: SystemTime) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    let now = x509_parser::time::ASN1Time::from_timestamp(i64::try_from(secs).ok()?).ok()?;
    let validity = parsed.validity();
    if now > validity.not_after {
        Some(format!("expired at {}", validity.not_after))
    } else if now < validity.not_before {
        Some(format!("not valid before {}", validity.not_before))
    } else {
        None
    }
}

/// The most bytes a PEM file may have: a system's whole CA bundle is a few
/// hundred kilobytes.
const MAX_PEM_FILE: u64 = 4 * 1024 * 1024;

/// `path`'s bytes (see [`files::read`]); a failure to read it is `failed`'s
/// (the certificates', or the key's) as before, the file being no regular
/// file, or too large, is [`TlsError::File`].
fn read_pem(path: &Path, failed: impl FnOnce(pem::Error) -> TlsError) -> Result<Vec<u8>, TlsError> {
    files::read(path, MAX_PEM_FILE, "a PEM file").map_err(|cause| match cause {
        files::ReadError::Io(e) => failed(pem::Error::Io(e)),
        cause => TlsError::File {
            path: path.to_owned(),
            cause,
        },
    })
}

fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_pem(path, |cause| TlsError::Key {
        path: path.to_owned(),
        cause,
    })
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|cause| TlsError::Key {
        path: path.to_owned(),
        cause,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let failed = |cause| TlsError::Certificates {
        path: path.to_owned(),
        cause,
    };
    let pem = read_pem(path, failed)?;
    let certs = (CertificateDer::pem_slice_iter(&pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// The CA certificates `cas`, read from `path`, as trust roots.
fn roots(path: &Path, cas: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in cas {
        roots
            .add(cert.clone())
            .map_err(|cause| TlsError::CaCertificate {
                path: path.to_owned(),
                cause,
            })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, as PEM files in `dir`.
    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn refusal(cert: &Path, key: &Path, ca: Option<&Path>) -> String {
        match acceptor(cert, key, ca) {
            Ok(_) => panic!("accepted {cert:?} with {key:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_client_tls_is_the_same_while_its_files_say_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = self_signed(dir.path(), "ca");
        let (cert, key) = self_signed(dir.path(), "client");
        let load = || ClientTls::load("localhost", &ca, Some((&cert, &key))).unwrap();
        let before = load();
        assert_eq!(before, load(), "a reload keeps the output");
        assert_ne!(
            before,
            ClientTls::load("other", &ca, Some((&cert, &key))).unwrap()
        );
        // The client certificate renewed in place: the output starts anew.
        let (renewed, renewed_key) = self_signed(dir.path(), "renewed");
        std::fs::rename(renewed, &cert).unwrap();
        std::fs::rename(renewed_key, &key).unwrap();
        assert_ne!(before, load());
        assert!(!format!("{before:?}").contains("PRIVATE"), "no key in logs");
        let refused = ClientTls::load("not a name!", &ca, None).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "`not a name!` is not a name or address a certificate can be checked against"
        );
    }

    #[test]
    fn each_bad_file_is_named_with_what_is_wrong_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "server");
        let (_, other_key) = self_signed(dir.path(), "other");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let missing = dir.path().join("missing.key");

        assert!(acceptor(&cert, &key, None).is_ok());
        assert!(acceptor(&cert, &key, Some(&cert)).is_ok(), "a CA file");

        let text = refusal(&cert, &missing, None);
        assert!(
            text.starts_with(&format!("reading the TLS key from {}: ", missing.display())),
            "{text}"
        );
        assert_eq!(
            refusal(&empty, &key, None),
            format!("{}: no certificate found", empty.display())
        );
        assert_eq!(
            refusal(&cert, &key, Some(&empty)),
            format!("{}: no certificate found", empty.display()),
            "the client CA file"
        );
        assert_eq!(
            refusal(&cert, &other_key, None),
            format!(
                "{}: not the private key of the certificate in {}",
                other_key.display(),
                cert.display()
            )
        );
        // PEM around bytes that are no certificate: the certificate's fault.
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let text = refusal(&garbage, &key, None);
        assert!(
            text.starts_with(&format!(
                "{}: not a usable certificate: ",
                garbage.display()
            )),
            "{text}"
        );
    }

    #[test]
    fn a_certificate_out_of_its_dates_is_told_apart() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 2, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der();
        let at = |secs: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        // 2020-01-15, 2020-03-01 and 2019-12-01.
        assert_eq!(out_of_date(der, at(1_579_046_400)), None);
        let expired = out_of_date(der, at(1_583_020_800)).unwrap();
        assert!(
            expired.starts_with("expired at Feb  1 00:00:00 2020"),
            "{expired}"
        );
        let early = out_of_date(der, at(1_575_158_400)).unwrap();
        assert!(
            early.starts_with("not valid before Jan  1 00:00:00 2020"),
            "{early}"
        );
    }
}
