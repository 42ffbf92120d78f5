//! The request pool: distinct (identity, CSR, token) triples, written once and
//! reused by every run, so both servers see exactly the same requests.
//!
//! Tokens come from the dev token issuer (`--state-dir`), or, for the
//! Kubernetes path, from a token file written by `kube-setup` (`--tokens`):
//! one request per workload with that workload's own token (sidecars), or
//! with `--node-token` one request per workload sent with the node agent's
//! token and `ImpersonatedIdentity` = the workload (ztunnel: empty-subject
//! P-256 CSRs). `--cluster-id` adds the `clusterid` header.

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
    #[arg(long, required_unless_present = "tokens")]
    state_dir: Option<PathBuf>,
    /// Use these tokens instead of minting (`kube-setup --tokens`: one
    /// `{identity, token}` JSON object per line); one request per line,
    /// `--size` is ignored.
    #[arg(long, conflicts_with = "state_dir")]
    tokens: Option<PathBuf>,
    /// With `--tokens`: send every request with this token (a node agent's,
    /// e.g. ztunnel's) and `ImpersonatedIdentity` = the line's identity; the
    /// CSRs are ztunnel's (empty subject, P-256).
    #[arg(long, requires = "tokens")]
    node_token: Option<PathBuf>,
    /// Send this `clusterid` header (istio-agent's and ztunnel's `ClusterID`).
    #[arg(long)]
    cluster_id: Option<String>,
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
    /// The `clusterid` header, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// `ImpersonatedIdentity` request metadata, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonate: Option<String>,
}

/// One line of a token file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenLine {
    pub identity: String,
    pub token: String,
}

pub fn run(args: PoolArgs) -> Result<(), String> {
    let key_type = match args.key.as_str() {
        "rsa-2048" => WorkloadKeyType::Rsa2048,
        "ecdsa-p256" => WorkloadKeyType::EcdsaP256,
        other => return Err(format!("unknown key type {other:?}")),
    };
    if let Some(tokens) = &args.tokens {
        return from_tokens(&args, tokens, key_type);
    }
    let state_dir = args
        .state_dir
        .as_ref()
        .ok_or("--state-dir or --tokens is required")?;
    let issuer = DevTokenIssuer::load_or_create(state_dir)?;
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
            cluster_id: args.cluster_id.clone(),
            impersonate: None,
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

/// A pool from a token file: sidecars (each workload with its own token) or,
/// with `--node-token`, a node agent asking for each workload.
fn from_tokens(
    args: &PoolArgs,
    tokens: &std::path::Path,
    key_type: WorkloadKeyType,
) -> Result<(), String> {
    let node_token = match &args.node_token {
        Some(path) => {
            if key_type != WorkloadKeyType::EcdsaP256 {
                return Err("--node-token: ztunnel's CSRs are P-256 (--key ecdsa-p256)".into());
            }
            let t =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(t.trim().to_owned())
        }
        None => None,
    };
    let f = std::fs::File::open(tokens).map_err(|e| format!("{}: {e}", tokens.display()))?;
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if !line.trim().is_empty() {
            let t: TokenLine =
                serde_json::from_str(&line).map_err(|e| format!("{}: {e}", tokens.display()))?;
            lines.push(t);
        }
    }
    if lines.is_empty() {
        return Err(format!("{}: no tokens", tokens.display()));
    }
    let keys: Vec<rcgen::KeyPair> = match key_type {
        WorkloadKeyType::Rsa2048 => (0..args.rsa_keys.max(1))
            .map(|_| key_type.generate())
            .collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };
    let subject = if node_token.is_some() {
        CsrSubject::Empty
    } else {
        CsrSubject::IstioAgent
    };
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?,
    );
    for (i, t) in lines.iter().enumerate() {
        let id = SpiffeId::parse(&t.identity).map_err(|e| format!("{}: {e}", t.identity))?;
        let fresh;
        let key = if keys.is_empty() {
            fresh = key_type.generate()?;
            &fresh
        } else {
            &keys[i % keys.len()]
        };
        let entry = Entry {
            identity: id.to_string(),
            csr: client::make_csr(key, &id, subject)?,
            token: node_token.clone().unwrap_or_else(|| t.token.clone()),
            cluster_id: args.cluster_id.clone(),
            impersonate: node_token.as_ref().map(|_| id.to_string()),
        };
        let line = serde_json::to_string(&entry).map_err(|e| e.to_string())?;
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {} requests ({}, {}) to {}",
        lines.len(),
        args.key,
        if node_token.is_some() {
            "node token + ImpersonatedIdentity"
        } else {
            "one token per workload"
        },
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
