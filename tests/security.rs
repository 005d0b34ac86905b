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
    let server = spawn(&["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca]);
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
}
