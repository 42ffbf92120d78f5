//! meshsign: a certificate authority for service meshes that speaks Istio's
//! `IstioCertificateService/CreateCertificate` API.
//!
//! A request flows one way through the modules:
//! [`server`] (transport, TLS, gRPC) → [`auth`] (who is calling) →
//! [`csr`] (what is asked) → [`policy`] (is it allowed) → [`ca`] (key, chain,
//! signing) → response, and [`audit`] records each decision. [`config`] is
//! parsed and validated once at start-up; no module reads environment
//! variables, and files are read only where the configuration names them
//! (the CA bundle, JWKS files), at start-up and on refresh, never per
//! request (audit records are written by a thread of their own).

pub mod audit;
pub mod auth;
pub mod ca;
pub mod client;
pub mod clock;
pub mod config;
pub mod csr;
pub mod error;
pub mod k8s;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod proto;
pub mod ratelimit;
pub mod server;
pub mod spiffe;
pub mod supervise;
pub mod token;
