//! wss:// for the load generator: a non-blocking stream that is plain TCP or rustls over
//! TCP behind the `Read`/`Write` the engine uses. A short read still means the socket is
//! empty (the engine relies on it with edge-triggered events).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};

/// How a run verifies the gateway's certificate (part of the plan).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsPlan {
    /// The name the certificate must carry (the URL's host).
    pub server_name: String,
    /// PEM certificates to trust instead of none.
    pub ca_file: Option<std::path::PathBuf>,
    /// Accept any certificate (signatures are still checked): for tests only.
    pub insecure: bool,
}

/// A connector: the client configuration and the name to verify.
#[derive(Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Connector {
    pub fn new(plan: &TlsPlan) -> Result<Connector, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut config = if plan.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            if let Some(path) = &plan.ca_file {
                let shown = path.display();
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("--ca-file {shown}: {e}"))?
                {
                    let cert = cert.map_err(|e| format!("--ca-file {shown}: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("--ca-file {shown}: {e}"))?;
                }
            }
            if roots.is_empty() {
                return Err("wss:// needs --ca-file FILE (PEM) or --insecure".into());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(plan.server_name.clone())
            .map_err(|e| format!("{:?}: {e}", plan.server_name))?;
        Ok(Connector {
            config: Arc::new(config),
            name,
        })
    }
}

/// A connection's byte stream.
pub struct Stream {
    sock: TcpStream,
    tls: Option<Box<ClientConnection>>,
}

fn broken(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Stream {
    pub fn new(sock: TcpStream, connector: Option<&Connector>) -> io::Result<Stream> {
        let tls = match connector {
            Some(c) => Some(Box::new(
                ClientConnection::new(c.config.clone(), c.name.clone()).map_err(broken)?,
            )),
            None => None,
        };
        Ok(Stream { sock, tls })
    }

    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.sock.take_error()
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock.peer_addr()
    }

    fn send_records(&mut self) -> io::Result<()> {
        match self.tls.as_mut() {
            Some(tls) => send_records(tls, &mut self.sock),
            None => Ok(()),
        }
    }
}

/// Writes the records rustls holds; WouldBlock while some remain.
fn send_records(tls: &mut ClientConnection, sock: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(sock)?;
    }
    Ok(())
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.sock.read(buf);
        };
        let mut n = 0;
        loop {
            match tls.reader().read(&mut buf[n..]) {
                Ok(0) => return Ok(n), // close_notify
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if n == 0 => return Err(e),
                Err(_) => return Ok(n),
            }
            if n == buf.len() {
                return Ok(n);
            }
            // Short only once the socket is empty.
            match tls.read_tls(&mut self.sock) {
                Ok(0) => return Ok(n),
                Ok(_) => {
                    tls.process_new_packets().map_err(broken)?;
                    // Handshake answers; what the socket does not take goes with the
                    // next write or writable event.
                    match send_records(tls, &mut self.sock) {
                        Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                        _ => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => return Ok(n),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.sock.write(buf);
        }
        // Records left from before first: the engine retries on the next writable event.
        self.send_records()?;
        let n = self.tls.as_mut().map_or(Ok(0), |t| t.writer().write(buf))?;
        match self.send_records() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_records()
    }
}

impl mio::event::Source for Stream {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        self.sock.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        self.sock.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        self.sock.deregister(registry)
    }
}

/// `--insecure`: any certificate, but the handshake signatures are still verified.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
