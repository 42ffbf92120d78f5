//! The crypto floor: the unavoidable cryptography of one certificate (verify
//! the CSR's signature, verify the JWT's signature, sign the leaf) with the
//! crypto library meshsign uses (aws-lc-rs), on one core. Its inverse is the
//! most certificates per second per core any implementation on this machine
//! can issue with these key types.
//!
//! For comparison it also times meshsign's whole in-process pipeline
//! (authenticate, validate the CSR, policy, sign, encode the response) on one
//! core, i.e. everything but gRPC and TLS.

use std::time::{Duration, Instant};

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use base64::Engine as _;
use clap::Args;
use serde_json::json;
use x509_parser::prelude::*;

use meshsign::auth::jwt::JwksSource;
use meshsign::auth::{JwtAuthenticator, JwtIssuer};
use meshsign::ca::generate::{self, CaSpec, KeyType};
use meshsign::ca::{Ca, LeafSpec, SanEntry};
use meshsign::client::{self, CsrSubject, WorkloadKeyType};
use meshsign::csr::{self, KeyPolicy};
use meshsign::policy::Policy;
use meshsign::spiffe::SpiffeId;
use meshsign::token::{DevTokenIssuer, TokenRequest};

#[derive(Args, Debug)]
pub struct FloorArgs {
    /// CA key: ecdsa-p256, ecdsa-p384, rsa-2048, ...
    #[arg(long, default_value = "ecdsa-p256")]
    ca_key: KeyType,
    /// Workload key: rsa-2048 or ecdsa-p256.
    #[arg(long, default_value = "ecdsa-p256")]
    workload_key: String,
    /// Measure for this long per part.
    #[arg(long, default_value = "3s", value_parser = crate::parse_duration)]
    duration: Duration,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    #[arg(long, default_value = "floor")]
    label: String,
}

/// Runs `f` repeatedly for about `d`; returns seconds per call.
fn time_per_call(d: Duration, mut f: impl FnMut() -> bool) -> Result<f64, String> {
    // Warm up.
    for _ in 0..50 {
        if !f() {
            return Err("operation failed".into());
        }
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        for _ in 0..16 {
            if !f() {
                return Err("operation failed".into());
            }
        }
        n += 16;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

pub fn run(args: FloorArgs) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("meshsign-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let now = ::time::OffsetDateTime::now_utc();
    let spec = |cn: &str| CaSpec {
        organization: "bench".into(),
        common_name: cn.into(),
        locality: None,
        key_type: args.ca_key,
        validity: ::time::Duration::days(30),
        path_len: None,
    };
    let root = generate::root(&spec("root"), now).map_err(|e| e.to_string())?;
    let inter =
        generate::intermediate(&root, &spec("intermediate"), now).map_err(|e| e.to_string())?;
    generate::write_istio_layout(&dir, &inter, &inter.cert_pem, &root.cert_pem)
        .map_err(|e| e.to_string())?;
    let ca = Ca::load(&dir, now).map_err(|e| e.to_string())?;

    let wl_type = match args.workload_key.as_str() {
        "rsa-2048" => WorkloadKeyType::Rsa2048,
        "ecdsa-p256" => WorkloadKeyType::EcdsaP256,
        other => return Err(format!("unknown workload key {other:?}")),
    };
    let wl_key = wl_type.generate()?;
    let id = SpiffeId::new("cluster.local", "default", "bench").map_err(|e| e.to_string())?;
    let csr_pem = client::make_csr(&wl_key, &id, CsrSubject::IstioAgent)?;
    let issuer = DevTokenIssuer::load_or_create(&dir.join("issuer"))?;
    let token = issuer.mint(&TokenRequest::new("default", "bench"))?;

    // --- the floor: raw signature operations -------------------------------
    let csr_der = ::pem::parse(&csr_pem)
        .map_err(|e| e.to_string())?
        .into_contents();
    let (_, parsed) = X509CertificationRequest::from_der(&csr_der).map_err(|e| e.to_string())?;
    let tbs = parsed.certification_request_info.raw.to_vec();
    let sig = parsed.signature_value.data.to_vec();
    let spki_bits = parsed
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    let csr_alg: &dyn signature::VerificationAlgorithm = match wl_type {
        WorkloadKeyType::Rsa2048 => &signature::RSA_PKCS1_2048_8192_SHA256,
        _ => &signature::ECDSA_P256_SHA256_ASN1,
    };
    let csr_key = UnparsedPublicKey::new(csr_alg, &spki_bits);
    let t_csr = time_per_call(args.duration, || csr_key.verify(&tbs, &sig).is_ok())?;

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (signing_input, jwt_sig) = token.rsplit_once('.').ok_or("bad token")?;
    let jwt_sig = b64.decode(jwt_sig).map_err(|e| e.to_string())?;
    let jwks: serde_json::Value = serde_json::from_str(issuer.jwks()).map_err(|e| e.to_string())?;
    let k = &jwks["keys"][0];
    let mut point = vec![4u8];
    point.extend(
        b64.decode(k["x"].as_str().unwrap_or_default())
            .map_err(|e| e.to_string())?,
    );
    point.extend(
        b64.decode(k["y"].as_str().unwrap_or_default())
            .map_err(|e| e.to_string())?,
    );
    let jwt_key = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point);
    let t_jwt = time_per_call(args.duration, || {
        jwt_key.verify(signing_input.as_bytes(), &jwt_sig).is_ok()
    })?;

    let sign_key = args.ca_key.generate().map_err(|e| e.to_string())?;
    let leaf_tbs = vec![0x5au8; 420];
    let t_sign = time_per_call(args.duration, || {
        rcgen::SigningKey::sign(&sign_key, &leaf_tbs).is_ok()
    })?;
    let floor_cps = 1.0 / (t_csr + t_jwt + t_sign);

    // --- meshsign's pipeline, in process ----------------------------------
    let jwt_issuer = JwtIssuer::new(
        "meshsign-dev".into(),
        vec!["istio-ca".into()],
        JwksSource::Static,
        Duration::from_secs(60),
    );
    jwt_issuer.set_jwks(issuer.jwks().as_bytes(), None)?;
    let authn = JwtAuthenticator::new(
        vec![std::sync::Arc::new(jwt_issuer)],
        "cluster.local".into(),
    );
    let policy = Policy::new("cluster.local");
    let keys = KeyPolicy::default();
    let t_pipeline = time_per_call(args.duration, || {
        let Ok(caller) = authn.verify(&token) else {
            return false;
        };
        let Ok(v) = csr::validate(&csr_pem, &keys) else {
            return false;
        };
        if policy.authorize(&caller.id, &v.identity).is_err() {
            return false;
        }
        let Ok((nb, na)) = policy.validity(86_400, ::time::OffsetDateTime::now_utc()) else {
            return false;
        };
        let sans = [SanEntry::Uri(v.identity.to_string())];
        let Ok(leaf) = ca.sign(&LeafSpec {
            spki_der: &v.spki_der,
            common_name: None,
            sans: &sans,
            not_before: nb,
            not_after: na,
        }) else {
            return false;
        };
        let mut chain = vec![meshsign::pki::cert_pem(&leaf)];
        chain.extend(ca.response_tail().iter().cloned());
        chain.len() > 1
    })?;
    let pipeline_cps = 1.0 / t_pipeline;
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "{:<28} CA {} / workload {}: CSR verify {:.1} µs + JWT verify {:.1} µs + sign {:.1} µs = floor {:.0} cert/s/core; meshsign in-process pipeline {:.1} µs = {:.0} cert/s/core ({:.0}% of floor)",
        args.label,
        args.ca_key,
        args.workload_key,
        t_csr * 1e6,
        t_jwt * 1e6,
        t_sign * 1e6,
        floor_cps,
        t_pipeline * 1e6,
        pipeline_cps,
        pipeline_cps / floor_cps * 100.0
    );
    if let Some(path) = &args.json {
        crate::append_json(
            path,
            &json!({
                "label": args.label,
                "kind": "floor",
                "ca_key": args.ca_key.to_string(),
                "workload_key": args.workload_key,
                "csr_verify_us": t_csr * 1e6,
                "jwt_verify_us": t_jwt * 1e6,
                "sign_us": t_sign * 1e6,
                "floor_certs_per_s_per_core": floor_cps,
                "pipeline_us": t_pipeline * 1e6,
                "pipeline_certs_per_s_per_core": pipeline_cps,
            }),
        )?;
    }
    Ok(())
}
