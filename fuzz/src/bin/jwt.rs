//! Fuzz target `jwt`: `JwtAuthenticator::verify` with two configured issuers
//! holding a fixed JWKS (RSA, P-256, P-384, Ed25519 and an ignored `oct`
//! key, all test-only keys from fuzz/keys), and `JwtIssuer::set_jwks`.
//!
//! Input: one mode byte, then the body. Mode = byte & 3:
//! - 0: the body is the token string;
//! - 1: the body is `header JSON \0 payload JSON \0 signature bytes`, each
//!   base64url-encoded by the harness into `h.p.s`, so the JSON layer is
//!   reached without the fuzzer having to find base64;
//! - 2: the body is `header JSON \0 payload JSON`, and the harness signs
//!   it with the test key for the header's `alg`: the signature verifies,
//!   and the claim checks (`exp`, `nbf`, `aud`, `sub`, `kubernetes.io`,
//!   the SPIFFE ID) see mutated claims;
//! - 3: the body is a JWKS document for `set_jwks` (then a fixed token is verified with it).
//!
//! Seed files start with an ASCII digit '0'..'3'.

use std::time::Duration;

use meshsign::auth::jwt::JwksSource;
use meshsign::auth::{JwtAuthenticator, JwtIssuer};
use meshsign_fuzz::{
    b64url, fields, jwt_authenticator, text, warm_up_once, TokenSigner, AUDIENCE, ISSUER,
};

struct Harness {
    authn: JwtAuthenticator,
    signer: TokenSigner,
    /// Verified with each JWKS of mode 3.
    fixed_token: String,
}

impl Harness {
    fn run(&self, data: &[u8]) {
        let (authn, signer, fixed_token) = (&self.authn, &self.signer, &self.fixed_token);
        let Some((&mode, body)) = data.split_first() else {
            return;
        };
        let token = match mode & 3 {
            0 => text(body).into_owned(),
            1 => {
                let f = fields(body, 3);
                format!("{}.{}.{}", b64url(f[0]), b64url(f[1]), b64url(f[2]))
            }
            2 => {
                let f = fields(body, 2);
                signer.sign(f[0], f[1])
            }
            _ => {
                let issuer = JwtIssuer::new(
                    ISSUER.to_owned(),
                    vec![AUDIENCE.to_owned()],
                    JwksSource::Static,
                    Duration::from_secs(60),
                );
                let loaded = issuer.set_jwks(body, None);
                if meshsign_fuzz::debug() {
                    eprintln!("set_jwks: {loaded:?}");
                }
                if let Ok(n) = loaded {
                    assert_eq!(n, issuer.key_count());
                    let authn = JwtAuthenticator::new(
                        vec![std::sync::Arc::new(issuer)],
                        meshsign_fuzz::TRUST_DOMAIN.to_owned(),
                    );
                    let result = authn.verify(fixed_token);
                    if meshsign_fuzz::debug() {
                        eprintln!("{n} keys: {result:?}");
                    }
                }
                return;
            }
        };
        let result = authn.verify(&token);
        if meshsign_fuzz::debug() {
            eprintln!("{result:?}");
        }
        match result {
            // An accepted token names a service account in the mesh.
            Ok(caller) => assert_eq!(caller.id.trust_domain(), meshsign_fuzz::TRUST_DOMAIN),
            // Refusal messages are logged: they must never carry the token.
            Err(e) => {
                if let Some((_, signature)) = token.rsplit_once('.') {
                    assert!(
                        signature.len() < 16 || !e.to_string().contains(signature),
                        "refusal message shows the token's signature"
                    );
                }
            }
        }
    }
}

/// Run once per fuzzed process before the first input (see `warm_up_once`).
const WARM_UP: &[&[u8]] = &[
    include_bytes!("../../seeds/jwt/0-valid-rs256"),
    include_bytes!("../../seeds/jwt/0-valid-es384"),
    include_bytes!("../../seeds/jwt/0-valid-eddsa"),
    include_bytes!("../../seeds/jwt/1-structured"),
    include_bytes!("../../seeds/jwt/2-eddsa-k8s"),
    include_bytes!("../../seeds/jwt/3-jwks"),
];

fn main() {
    let signer = TokenSigner::new();
    let fixed_token = signer.sign(
        br#"{"alg":"ES256","kid":"fuzz-p256"}"#,
        format!(
            r#"{{"iss":"{ISSUER}","aud":"{AUDIENCE}","exp":4102444800,"sub":"system:serviceaccount:default:web"}}"#
        )
        .as_bytes(),
    );
    // A panic aborts the process (afl.rs's hook), so nothing is observed
    // after an unwind: unwind safety does not matter here.
    let harness = std::panic::AssertUnwindSafe(Harness {
        authn: jwt_authenticator(),
        signer,
        fixed_token,
    });
    afl::fuzz!(|data: &[u8]| {
        warm_up_once(|| WARM_UP.iter().for_each(|seed| harness.run(seed)));
        harness.run(data);
    });
}
