//! The request pool: distinct (identity, CSR, token) triples, written once and
//! reused by every run, so both servers see exactly the same requests.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use meshsign::client::{self, CsrSubject, WorkloadKeyType};
use meshsign::spiffe::SpiffeId;
use meshsign::token::{DevTokenIssuer, TokenRequest};

#[derive(Args, Debug)]
pub struct PoolArgs {
    /// Output file (JSON lines).
    #[arg(long)]
    out: PathBuf,
    /// Number of distinct requests.
    #[arg(long, default_value_t = 10_000)]
    size: usize,
    /// Workload key type: rsa-2048 or ecdsa-p256.
    #[arg(long, default_value = "ecdsa-p256")]
    key: String,
    /// RSA only: number of distinct keys (RSA key generation is slow; each key
    /// signs CSRs for size/keys different identities, so every CSR is distinct).
    #[arg(long, default_value_t = 64)]
    rsa_keys: usize,
    /// The dev token issuer's directory (its jwks.json is what the servers trust).
    #[arg(long)]
    state_dir: PathBuf,
    /// Token lifetime.
    #[arg(long, default_value = "6h", value_parser = crate::parse_duration)]
    token_ttl: std::time::Duration,
}

/// One request of the pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub identity: String,
    pub csr: String,
    pub token: String,
}

pub fn run(args: PoolArgs) -> Result<(), String> {
    let key_type = match args.key.as_str() {
        "rsa-2048" => WorkloadKeyType::Rsa2048,
        "ecdsa-p256" => WorkloadKeyType::EcdsaP256,
        other => return Err(format!("unknown key type {other:?}")),
    };
    let issuer = DevTokenIssuer::load_or_create(&args.state_dir)?;
    let keys: Vec<rcgen::KeyPair> = match key_type {
        WorkloadKeyType::Rsa2048 => (0..args.rsa_keys.max(1))
            .map(|_| key_type.generate())
            .collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?,
    );
    for i in 0..args.size {
        let ns = format!("bench-{}", i / 100);
        let sa = format!("workload-{i}");
        let id = SpiffeId::new("cluster.local", &ns, &sa).map_err(|e| e.to_string())?;
        let fresh;
        let key = if keys.is_empty() {
            fresh = key_type.generate()?;
            &fresh
        } else {
            &keys[i % keys.len()]
        };
        let csr = client::make_csr(key, &id, CsrSubject::IstioAgent)?;
        let token = issuer.mint(&TokenRequest {
            ttl: args.token_ttl,
            ..TokenRequest::new(&ns, &sa)
        })?;
        let line = serde_json::to_string(&Entry {
            identity: id.to_string(),
            csr,
            token,
        })
        .map_err(|e| e.to_string())?;
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {} requests ({}) to {}",
        args.size,
        args.key,
        args.out.display()
    );
    Ok(())
}

/// Reads a pool file.
pub fn load(path: &std::path::Path) -> Result<Vec<Entry>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut entries = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        entries.push(serde_json::from_str(&line).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    if entries.is_empty() {
        return Err(format!("{}: empty pool", path.display()));
    }
    Ok(entries)
}
