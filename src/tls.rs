//! TLS for the Riemann TCP protocol: a rustls server configuration (ring
//! provider) loaded from PEM files, optionally requiring client certificates
//! signed by a given CA. The handshake itself runs in [`tcp`](crate::tcp),
//! which serves plain and TLS connections with the same handler.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::VerifierBuilderError;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// Riemann's TLS port.
pub const DEFAULT_ADDR: &str = "127.0.0.1:5554";

/// Where the TLS listener binds, and how it handshakes.
#[derive(Clone)]
pub struct TlsListener {
    pub addr: SocketAddr,
    pub acceptor: TlsAcceptor,
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
    #[error("the TLS certificate and key do not go together: {0}")]
    Mismatch(tokio_rustls::rustls::Error),
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
    let key = PrivateKeyDer::from_pem_file(key).map_err(|cause| TlsError::Key {
        path: key.to_owned(),
        cause,
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                .build()
                .map_err(|cause| TlsError::ClientCa {
                    path: ca.to_owned(),
                    cause,
                })?,
        ),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::Mismatch)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|cause| TlsError::Certificates {
            path: path.to_owned(),
            cause,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|cause| TlsError::CaCertificate {
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
        let text = refusal(&cert, &other_key, None);
        assert!(
            text.starts_with("the TLS certificate and key do not go together: "),
            "{text}"
        );
    }
}
