//! Writes the generated seed files (run by seeds/make-seeds.sh from
//! fuzz/seeds, with the directory of openssl-made CSRs as its argument):
//! tokens signed with the test keys, `request` seeds, the CSR bodies for the
//! `csr` target's re-signing modes, and the config seeds copied from config/.

use std::fs;
use std::path::Path;

use meshsign_fuzz::{
    b64url, first_inner_element, pem_der, TokenSigner, AUDIENCE, FAR_FUTURE, ISSUER, ISSUER_2,
};
use serde_json::json;

fn write(path: &str, bytes: impl AsRef<[u8]>) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
}

fn with_mode(mode: u8, body: impl AsRef<[u8]>) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(body.as_ref());
    out
}

/// `a \0 b \0 ...`
fn joined(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&0u8)
}

fn main() {
    let csr_dir = std::env::args().nth(1).expect("usage: gen-seeds CSR_DIR");
    let csr_pem = |name: &str| {
        fs::read_to_string(Path::new(&csr_dir).join(format!("{name}.pem")))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let signer = TokenSigner::new();
    let sa = "system:serviceaccount:default:web";
    let claims = json!({"iss": ISSUER, "aud": [AUDIENCE], "exp": FAR_FUTURE, "sub": sa});
    let claims_bytes = serde_json::to_vec(&claims).unwrap();
    let k8s_claims = json!({
        "iss": ISSUER, "aud": ["kubernetes", AUDIENCE], "exp": FAR_FUTURE, "nbf": 1_700_000_000,
        "iat": 1_700_000_000, "sub": "system:serviceaccount:istio-system:ztunnel",
        "kubernetes.io": {
            "namespace": "istio-system",
            "serviceaccount": {"name": "ztunnel", "uid": "5b1ae5b1-0000-4000-8000-000000000001"},
            "pod": {"name": "ztunnel-abcde", "uid": "5b1ae5b1-0000-4000-8000-000000000002"},
            "node": {"name": "node-1", "uid": "5b1ae5b1-0000-4000-8000-000000000003"}
        }
    });
    let header = |alg: &str, kid: Option<&str>| {
        let mut h = json!({"alg": alg, "typ": "JWT"});
        if let Some(kid) = kid {
            h["kid"] = json!(kid);
        }
        serde_json::to_vec(&h).unwrap()
    };
    let token = |alg: &str, kid: Option<&str>, claims: &serde_json::Value| {
        signer.sign(&header(alg, kid), &serde_json::to_vec(claims).unwrap())
    };

    // jwt target, mode 0: whole tokens.
    fs::create_dir_all("jwt").unwrap();
    let valid = [
        ("rs256", "RS256", Some("fuzz-rsa")),
        ("ps384", "PS384", Some("fuzz-rsa")),
        ("es256", "ES256", Some("fuzz-p256")),
        ("es384", "ES384", Some("fuzz-p384")),
        ("eddsa", "EdDSA", Some("fuzz-ed25519")),
        ("es256-no-kid", "ES256", None),
    ];
    for (name, alg, kid) in valid {
        write(
            &format!("jwt/0-valid-{name}"),
            with_mode(b'0', token(alg, kid, &claims)),
        );
    }
    write(
        "jwt/0-valid-k8s-claims",
        with_mode(b'0', token("ES256", Some("fuzz-p256"), &k8s_claims)),
    );
    let mut second = claims.clone();
    second["iss"] = json!(ISSUER_2);
    second["aud"] = json!("other");
    write(
        "jwt/0-second-issuer",
        with_mode(b'0', token("EdDSA", Some("fuzz-ed25519"), &second)),
    );
    let mut expired = claims.clone();
    expired["exp"] = json!(1_600_000_000);
    write(
        "jwt/0-expired",
        with_mode(b'0', token("ES256", Some("fuzz-p256"), &expired)),
    );
    write(
        "jwt/0-wrong-kid",
        with_mode(b'0', token("ES256", Some("no-such-key"), &claims)),
    );
    write(
        "jwt/0-hs256",
        with_mode(b'0', token("HS256", Some("fuzz-hmac"), &claims)),
    );
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(&claims_bytes)
    );
    write("jwt/0-alg-none", with_mode(b'0', none));
    let crit = signer.sign(
        br#"{"alg":"ES256","kid":"fuzz-p256","crit":["exp"],"exp":1}"#,
        &claims_bytes,
    );
    write("jwt/0-crit", with_mode(b'0', crit));

    // Mode 1: header \0 payload \0 signature bytes.
    write(
        "jwt/1-structured",
        with_mode(
            b'1',
            joined(&[
                &header("ES256", Some("fuzz-p256")),
                &claims_bytes,
                &[0x5a; 64],
            ]),
        ),
    );
    // Mode 2: header \0 payload, signed by the harness.
    let mode2 = |name: &str, header: &[u8], claims: &serde_json::Value| {
        write(
            &format!("jwt/2-{name}"),
            with_mode(
                b'2',
                joined(&[header, &serde_json::to_vec(claims).unwrap()]),
            ),
        );
    };
    mode2("es256", &header("ES256", Some("fuzz-p256")), &claims);
    mode2("eddsa-k8s", &header("EdDSA", None), &k8s_claims);
    let mut mismatch = k8s_claims.clone();
    mismatch["sub"] = json!(sa);
    mode2("rs256-sub-mismatch", &header("RS256", None), &mismatch);
    let mut odd = claims.clone();
    odd["aud"] = json!(AUDIENCE);
    odd["exp"] = json!(4_102_444_800.5);
    odd["nbf"] = json!(5_000_000_000u64);
    odd["sub"] = json!("system:serviceaccount:Default:web_1");
    mode2(
        "es384-odd-claims",
        &header("ES384", Some("fuzz-p384")),
        &odd,
    );
    // Mode 3: a JWKS document.
    write(
        "jwt/3-jwks",
        with_mode(b'3', meshsign_fuzz::keys::JWKS.as_bytes()),
    );
    write(
        "jwt/3-jwks-one-ec",
        with_mode(
            b'3',
            r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA","kid":"k"},{"kty":"RSA","n":"AQAB","e":"AQAB"},{"kty":"OKP","crv":"Ed25519","x":"AAAA"}]}"#,
        ),
    );

    // csr target, modes 2-4: CertificationRequestInfo DER to re-sign.
    let info = |name: &str| {
        let der = pem_der(&csr_pem(name));
        first_inner_element(&der)
            .expect("a CSR is SEQUENCE { info, ... }")
            .to_vec()
    };
    for name in ["ed25519", "ed25519-ztunnel"] {
        write(&format!("csr/{name}.info"), with_mode(b'2', info(name)));
    }
    write(
        "csr/rsa2048-istio-agent.info",
        with_mode(b'3', info("rsa2048-istio-agent")),
    );
    for name in ["p256-allowed-exts", "p256-cn-is-id", "p256-dns-and-uri"] {
        write(&format!("csr/{name}.info"), with_mode(b'4', info(name)));
    }

    // csr target: CSRs as meshsign's own client (istio-agent's shape: `O=""`)
    // and ztunnel's (empty subject) make them.
    for (name, subject) in [
        ("istio-agent", meshsign::client::CsrSubject::IstioAgent),
        ("ztunnel", meshsign::client::CsrSubject::Empty),
    ] {
        let key = meshsign::client::WorkloadKeyType::EcdsaP256
            .generate()
            .unwrap();
        let id = meshsign::spiffe::SpiffeId::new("cluster.local", "default", "web").unwrap();
        let pem = meshsign::client::make_csr(&key, &id, subject).unwrap();
        write(&format!("csr/meshsign-client-{name}"), with_mode(b'0', pem));
    }

    // request target: flags, then auth | clusterid | impersonate | ttl | csr | cert.
    fs::create_dir_all("request").unwrap();
    let bearer = |t: String| format!("Bearer {t}").into_bytes();
    let web_token = bearer(token("ES256", Some("fuzz-p256"), &claims));
    let ztunnel_token = bearer(token("RS256", Some("fuzz-rsa"), &k8s_claims));
    let mut kube_system = claims.clone();
    kube_system["sub"] = json!("system:serviceaccount:kube-system:default");
    let kube_system_token = bearer(token("EdDSA", Some("fuzz-ed25519"), &kube_system));
    let expired_token = bearer(token("ES256", Some("fuzz-p256"), &expired));
    let web_csr = csr_pem("p256-istio-agent");
    let request = |name: &str, flags: u8, fields: [&[u8]; 6]| {
        let sep = meshsign_fuzz::FIELD_SEPARATOR;
        assert!(
            fields
                .iter()
                .all(|f| !f.windows(sep.len()).any(|w| w == sep)),
            "{name}: a field holds the separator"
        );
        let mut out = vec![flags];
        out.extend_from_slice(&fields.join(sep));
        write(&format!("request/{name}"), out);
    };
    let csr = |name: &str| csr_pem(name).into_bytes();
    request(
        "token-p256",
        0x01,
        [
            &web_token,
            b"Kubernetes",
            b"",
            b"3600",
            web_csr.as_bytes(),
            b"",
        ],
    );
    request(
        "token-rsa-csr",
        0x01,
        [&web_token, b"", b"", b"0", &csr("rsa2048-istio-agent"), b""],
    );
    request(
        "signed-claims-resigned-csr",
        0x0d,
        [
            &claims_bytes,
            b"",
            b"",
            b"86400",
            &info("ed25519-ztunnel"),
            b"",
        ],
    );
    request(
        "signed-claims-cn",
        0x05,
        [&claims_bytes, b"c1", b"", b"60", &csr("p256-cn-is-id"), b""],
    );
    request(
        "client-cert-alias",
        0x31,
        [b"", b"", b"", b"3600", &csr("p256-alias-trust-domain"), b""],
    );
    request(
        "client-cert-migrated",
        0x31,
        [b"", b"", b"", b"3600", &csr("p256-foo-migrated"), b""],
    );
    request(
        "client-cert-expired-window-and-token",
        0x11,
        [&web_token, b"", b"", b"3600", web_csr.as_bytes(), b""],
    );
    request(
        "ztunnel-impersonation",
        0x01,
        [
            &ztunnel_token,
            b"Kubernetes",
            b"spiffe://cluster.local/ns/default/sa/web",
            b"3600",
            &csr("ed25519-ztunnel"),
            b"",
        ],
    );
    request(
        "impersonation-number",
        0x81,
        [&web_token, b"", b"x", b"3600", web_csr.as_bytes(), b""],
    );
    request(
        "kube-system-denied",
        0x01,
        [
            &kube_system_token,
            b"",
            b"",
            b"3600",
            &csr("p256-kube-system"),
            b"",
        ],
    );
    request(
        "ttl-too-long",
        0x41,
        [
            &web_token,
            b"Kubernetes",
            b"",
            b"99999999999",
            web_csr.as_bytes(),
            b"",
        ],
    );
    request(
        "expired-token",
        0x01,
        [&expired_token, b"", b"", b"3600", web_csr.as_bytes(), b""],
    );
    request(
        "plaintext",
        0x00,
        [&web_token, b"", b"", b"3600", web_csr.as_bytes(), b""],
    );
    request(
        "no-peer",
        0x03,
        [&web_token, b"", b"", b"3600", web_csr.as_bytes(), b""],
    );
    request(
        "identity-mismatch",
        0x01,
        [&web_token, b"", b"", b"3600", &csr("p256-ztunnel"), b""],
    );

    // config target: the shipped examples (hand-written ones are kept).
    fs::create_dir_all("config").unwrap();
    for entry in fs::read_dir("../../config").expect("config/") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        fs::copy(&path, format!("config/{name}")).unwrap();
    }
}
