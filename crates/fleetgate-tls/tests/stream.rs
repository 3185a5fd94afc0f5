//! The unbuffered TLS stream against rustls' own buffered client (tokio-rustls): bulk data
//! both ways in records of every size, a slow reader, and a clean close in both directions.

use std::sync::Arc;

use fleetgate_tls::TlsStream;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// Bytes that differ at every position, so a dropped or repeated chunk shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn bulk_data_echoes_through_intact_and_both_sides_close_cleanly() {
    let (server_config, client_config) = configs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsStream::accept(tcp, server_config).await.unwrap();
        // Echo in uneven reads, so records are split and joined on the way back.
        let mut total = 0usize;
        let mut buf = vec![0u8; 3001];
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n]).await.unwrap();
            total += n;
        }
        tls.shutdown().await.unwrap();
        total
    });

    let connector = tokio_rustls::TlsConnector::from(client_config);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let sent = pattern(3 * 1024 * 1024 + 17);
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            // Writes of every size from 1 byte to past a record.
            let mut at = 0;
            let mut size = 1;
            while at < sent.len() {
                let end = (at + size).min(sent.len());
                wr.write_all(&sent[at..end]).await.unwrap();
                at = end;
                size = size * 3 % 40_000 + 1;
            }
            wr.flush().await.unwrap();
            wr.shutdown().await.unwrap();
        })
    };
    let mut back = Vec::new();
    // read_to_end fails on a missing close_notify: this checks the server's close too.
    rd.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(server.await.unwrap(), sent.len());
    assert_eq!(back.len(), sent.len());
    assert!(back == sent, "echoed bytes differ");
}

#[tokio::test]
async fn a_client_that_leaves_mid_handshake_is_an_error_not_a_stream() {
    let (server_config, _) = configs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        TlsStream::accept(tcp, server_config).await.map(|_| ())
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The start of a ClientHello record, then gone.
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    drop(tcp);
    let error = server.await.unwrap().expect_err("no stream");
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (server_config, _) = configs();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        TlsStream::accept(tcp, server_config).await.map(|_| ())
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let error = server.await.unwrap().expect_err("not TLS");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
}
