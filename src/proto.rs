//! The wire types of Istio's CA API (`istio.v1.auth`), generated from
//! `proto/ca.proto` at build time, plus the encoded descriptor set that the
//! reflection service publishes.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("istio.v1.auth");

/// Encoded `FileDescriptorSet` of `proto/ca.proto` and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("istio_ca_descriptor");

/// Fully qualified gRPC service name.
pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";
