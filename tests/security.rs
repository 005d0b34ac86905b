//! Security: bearer tokens with scopes, loopback-only anonymous serving, TLS and mutual TLS with
//! certificates generated in the test (rcgen), and request limits naming the limit.
mod common;

use std::time::Duration;

use common::server::{spawn, wait_serving};
use modserve::pb;
use modserve::pb::inference_client::InferenceClient;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

fn small(n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![504, 2365] })),
        max_new_tokens: n,
        ..Default::default()
    }
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn code_of(s: &tonic::Status) -> String {
    s.metadata().get("modserve-error-code").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scopes_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# test tokens\ninference-only-token-1 inference\nadmin-token-0000000001 admin\n").unwrap();
    let root = common::fixture("parity");
    let server = spawn(&[
        "--auth-tokens-file",
        tokens.to_str().unwrap(),
        "--adapter-root",
        root.to_str().unwrap(),
        "--max-new-tokens-limit",
        "64",
        "--max-prompt-tokens",
        "100",
        "--max-components",
        "2",
        "--max-stop-strings",
        "2",
        "--max-request-bytes",
        "65536",
    ]);
    wait_serving(&server.url, Duration::from_secs(120)).await;
    let mut c = InferenceClient::connect(server.url.clone()).await.unwrap();
    let mut a = pb::adapters_client::AdaptersClient::connect(server.url.clone()).await.unwrap();

    let e = c.generate(small(2)).await.unwrap_err();
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::Unauthenticated, "unauthenticated"));
    let e = c.generate(with_token(small(2), "wrong-token-wrong-token")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(c.generate(with_token(small(2), "inference-only-token-1")).await.unwrap().into_inner().token_ids.len(), 2);
    assert_eq!(c.generate(with_token(small(2), "admin-token-0000000001")).await.unwrap().into_inner().token_ids.len(), 2);
    // Scopes on the admin service.
    let e = a.evict(with_token(pb::ModuleRef { module_id: "lora_qv_r4".into() }, "inference-only-token-1")).await.unwrap_err();
    assert_eq!((e.code(), code_of(&e).as_str()), (Code::PermissionDenied, "permission_denied"));
    a.list(with_token(pb::ListRequest {}, "inference-only-token-1")).await.unwrap();
    a.evict(with_token(pb::ModuleRef { module_id: "lora_qv_r4".into() }, "admin-token-0000000001")).await.unwrap();

    // Limits, each INVALID_ARGUMENT naming the limit.
    let tok = "inference-only-token-1";
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (small(65), "max_new_tokens_limit"),
        (
            pb::GenerateRequest { prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![504; 101] })), ..small(2) },
            "max_prompt_tokens",
        ),
        (pb::GenerateRequest { stop: vec!["a".into(), "b".into(), "c".into()], ..small(2) }, "max_stop_strings"),
        (
            pb::GenerateRequest {
                deltas: ["lora_qv_r4", "lora_all_r8", "sft_lang"]
                    .iter()
                    .map(|id| pb::DeltaRef { module_id: id.to_string(), scale: 1.0, scale_is_set: true })
                    .collect(),
                ..small(2)
            },
            "max_components",
        ),
    ];
    for (req, limit) in cases {
        let e = c.generate(with_token(req, tok)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{limit}: {e}");
        assert_eq!(code_of(&e), "limit_exceeded", "{limit}");
        assert!(e.message().contains(limit), "{limit}: {}", e.message());
    }
    // Request bytes (decoded message size).
    let huge = pb::GenerateRequest { prompt: Some(pb::generate_request::Prompt::Text("x".repeat(100_000))), ..small(2) };
    let e = c.generate(with_token(huge, tok)).await.unwrap_err();
    assert!(matches!(e.code(), Code::ResourceExhausted | Code::InvalidArgument | Code::OutOfRange), "{e}");
}

#[test]
fn anonymous_serving_is_loopback_only() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modserve"))
        .args(["serve", "--listen", "0.0.0.0:0", "--metrics-listen", ""])
        .arg("--model")
        .arg(common::reference_model())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without authentication") && err.contains("--insecure-allow-anonymous"), "{err}");
}

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki { ca_pem: ca.pem(), server: leaf(vec!["localhost".into()]), client: leaf(vec!["client".into()]) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, s: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, s).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (cert, key, ca) = (w("server.pem", &p.server.0), w("server.key", &p.server.1), w("ca.pem", &p.ca_pem));
    let server = spawn(&["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca, "--http-listen", "127.0.0.1:0"]);
    let url = server.url.replace("http://", "https://").replace("127.0.0.1", "localhost");
    let base_tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&p.ca_pem)).domain_name("localhost");
    // With a client certificate signed by the CA: served (wait for the model through TLS).
    let tls = base_tls.clone().identity(Identity::from_pem(&p.client.0, &p.client.1));
    let t0 = std::time::Instant::now();
    let channel = loop {
        if let Ok(ep) = Channel::from_shared(url.clone()).unwrap().tls_config(tls.clone()) {
            if let Ok(ch) = ep.connect().await {
                let mut c = InferenceClient::new(ch.clone());
                match c.generate(small(2)).await {
                    Ok(_) => break ch,
                    Err(e) if e.code() == Code::Unavailable => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "TLS server never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let r = InferenceClient::new(channel).generate(small(3)).await.unwrap().into_inner();
    assert_eq!(r.token_ids.len(), 3);
    // Without a client certificate: the handshake (or the call) fails.
    let no_cert = Channel::from_shared(url.clone()).unwrap().tls_config(base_tls).unwrap().connect().await;
    if let Ok(ch) = no_cert {
        assert!(InferenceClient::new(ch).generate(small(2)).await.is_err(), "mTLS must reject clients without a certificate");
    }
    // Plain text against the TLS port fails.
    let plain = Channel::from_shared(server.url.clone()).unwrap().connect().await;
    if let Ok(ch) = plain {
        assert!(InferenceClient::new(ch).generate(small(2)).await.is_err());
    }
    // The HTTP API uses the same TLS files: HTTPS with a client certificate is served, without
    // one the handshake fails, and plain HTTP gets no answer.
    let http = server.http_addr.clone().unwrap();
    let (status, body) = https_get(&http, "/v1/models", &p.ca_pem, Some(&p.client)).expect("HTTPS with a client certificate");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"base\""), "{body}");
    assert!(https_get(&http, "/health", &p.ca_pem, None).is_err(), "mTLS must reject HTTPS clients without a certificate");
    let mut s = std::net::TcpStream::connect(&http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).starts_with("HTTP/1"), "plain HTTP answered on the TLS port");
}

/// One HTTPS/1.0 GET with rustls (trusting `ca_pem`, presenting `client` if given).
fn https_get(addr: &str, path: &str, ca_pem: &str, client: Option<&(String, String)>) -> Result<(u16, String), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let b =
        rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap().with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        // The server may close without close_notify after a complete response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("no status line: {text}"))?;
    Ok((status, text.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default()))
}
