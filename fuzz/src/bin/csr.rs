//! Fuzz target `csr`: `meshsign::csr::validate` (PEM armour, PKCS#10 DER,
//! key policy, signature, extensions, SANs, Common Name).
//!
//! Input: one mode byte, then the body. Mode = (byte & 7) % 5:
//! - 0: the body is the PEM text given to `validate` as it is;
//! - 1: the body is DER, wrapped in a `CERTIFICATE REQUEST` PEM block;
//! - 2, 3, 4: the body is the DER of a CertificationRequestInfo, signed by
//!   the harness with the test Ed25519, RSA-2048 or P-256 key into a whole
//!   CSR, so a mutated body still proves possession and reaches the
//!   extension, SAN and Common Name checks.
//!
//! Bit 3 of the mode byte picks the key policy: clear, RSA 2048-8192,
//! P-256, P-384 and Ed25519; set, meshsign's default (no Ed25519).
//! Seed files start with an ASCII digit: '0'..'4' are the modes, '8' and
//! '9' modes 0 and 1 under the default policy.

use meshsign::csr::{self, KeyPolicy};
use meshsign_fuzz::{pem, text, warm_up_once, CsrKey, CsrSigner};

struct Harness {
    signer: CsrSigner,
    permissive: KeyPolicy,
    default: KeyPolicy,
}

impl Harness {
    fn run(&self, data: &[u8]) {
        let Some((&mode, body)) = data.split_first() else {
            return;
        };
        let policy = if mode & 8 == 0 {
            &self.permissive
        } else {
            &self.default
        };
        let signer = &self.signer;
        let pem_text = match (mode & 7) % 5 {
            0 => text(body).into_owned(),
            1 => pem("CERTIFICATE REQUEST", body),
            2 => pem(
                "CERTIFICATE REQUEST",
                &signer.sign_info(body, CsrKey::Ed25519),
            ),
            3 => pem(
                "CERTIFICATE REQUEST",
                &signer.sign_info(body, CsrKey::Rsa2048),
            ),
            _ => pem("CERTIFICATE REQUEST", &signer.sign_info(body, CsrKey::P256)),
        };
        let result = csr::validate(&pem_text, policy);
        if meshsign_fuzz::debug() {
            eprintln!("{result:?}");
        }
        if let Ok(valid) = result {
            // What an accepted CSR promises: an allowed key and an identity
            // that round-trips.
            assert!(
                policy.allows(valid.key),
                "accepted a key the policy refuses"
            );
            let uri = valid.identity.to_string();
            assert_eq!(
                meshsign::spiffe::SpiffeId::parse(&uri).ok().as_ref(),
                Some(&valid.identity),
                "identity does not round-trip"
            );
        }
    }
}

/// Run once per fuzzed process before the first input (see `warm_up_once`).
const WARM_UP: &[&[u8]] = &[
    include_bytes!("../../seeds/csr/rsa2048-istio-agent"),
    include_bytes!("../../seeds/csr/p256-allowed-exts.der"),
    include_bytes!("../../seeds/csr/ed25519.info"),
    include_bytes!("../../seeds/csr/rsa2048-istio-agent.info"),
    include_bytes!("../../seeds/csr/p256-dns-and-uri.info"),
    include_bytes!("../../seeds/csr/p384"),
];

fn main() {
    let harness = Harness {
        signer: CsrSigner::new(),
        permissive: KeyPolicy {
            ed25519: true,
            ..KeyPolicy::default()
        },
        default: KeyPolicy::default(),
    };
    afl::fuzz!(|data: &[u8]| {
        warm_up_once(|| WARM_UP.iter().for_each(|seed| harness.run(seed)));
        harness.run(data);
    });
}
