//! `kube-setup`: one node's worth of Kubernetes objects for the
//! Kubernetes-path benchmark, created through the API as a controller and a
//! kubelet would: a namespace with N service accounts and one pod per
//! service account on `--node`, a pod-bound token (TokenRequest, audience
//! `istio-ca`) for each, and the node agent (ztunnel: its service account, a
//! pod on the same node and its pod-bound token).
//!
//! Pods keep phase Pending (there is no kubelet): istiod's and meshsign's node
//! authorization only skip Failed pods.
//!
//! Writes `--tokens` (one `{identity, token}` JSON object per workload, for
//! `pool --tokens`) and `--node-token` (the node agent's token).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::pool::TokenLine;

#[derive(Args, Debug)]
pub struct KubeSetupArgs {
    /// The API server (admin credentials).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Workloads: one service account, one pod and one token each.
    #[arg(long, default_value_t = 100)]
    workloads: usize,
    /// Their namespace.
    #[arg(long, default_value = "bench-app")]
    namespace: String,
    /// The node every pod runs on.
    #[arg(long, default_value = "node-1")]
    node: String,
    /// The node agent's service account, `<namespace>/<name>` (a trusted node account).
    #[arg(long, default_value = "istio-system/ztunnel")]
    node_agent: String,
    /// Token audience.
    #[arg(long, default_value = "istio-ca")]
    audience: String,
    /// Token lifetime (the API server's minimum is 10m).
    #[arg(long, default_value = "1h", value_parser = crate::parse_duration)]
    token_ttl: Duration,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// API calls in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Output: the workloads' tokens.
    #[arg(long)]
    tokens: PathBuf,
    /// Output: the node agent's token.
    #[arg(long)]
    node_token: PathBuf,
}

/// An admin client from a kubeconfig (its current context).
pub async fn client(kubeconfig: &Path) -> Result<Client, String> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    Client::try_from(config).map_err(|e| e.to_string())
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    }
}

async fn namespace(client: &Client, name: &str) -> Result<(), String> {
    let ns = Namespace {
        metadata: meta(name),
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(format!("namespace {name}: {e}")),
    }
}

/// A service account, a pod of it on `node`, and a token bound to that pod.
async fn workload(
    client: &Client,
    ns: &str,
    sa: &str,
    pod: &str,
    node: &str,
    audience: &str,
    ttl: Duration,
) -> Result<String, String> {
    let sa_obj = ServiceAccount {
        metadata: meta(sa),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa_obj)
        .await
        .map_err(|e| format!("service account {ns}/{sa}: {e}"))?;
    let pod_obj = Pod {
        metadata: meta(pod),
        spec: Some(PodSpec {
            service_account_name: Some(sa.into()),
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("example.invalid/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod_obj)
        .await
        .map_err(|e| format!("pod {ns}/{pod}: {e}"))?;
    let uid = created.metadata.uid.ok_or("pod without UID")?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(ttl.as_secs() as i64),
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: Some(pod.into()),
                uid: Some(uid),
            }),
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("token for {ns}/{sa}: {e}"))?;
    Ok(answer.status.ok_or("token request without status")?.token)
}

pub async fn run(args: KubeSetupArgs) -> Result<(), String> {
    let (agent_ns, agent_sa) = args
        .node_agent
        .split_once('/')
        .ok_or("--node-agent is <namespace>/<service account>")?;
    let client = client(&args.kubeconfig).await?;
    let started = Instant::now();
    namespace(&client, agent_ns).await?;
    namespace(&client, &args.namespace).await?;
    let node_token = workload(
        &client,
        agent_ns,
        agent_sa,
        &format!("{agent_sa}-{}", args.node),
        &args.node,
        &args.audience,
        args.token_ttl,
    )
    .await?;
    std::fs::write(&args.node_token, format!("{node_token}\n"))
        .map_err(|e| format!("{}: {e}", args.node_token.display()))?;

    let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.workloads {
        let (client, limit) = (client.clone(), limit.clone());
        let (ns, node, audience) = (
            args.namespace.clone(),
            args.node.clone(),
            args.audience.clone(),
        );
        let (ttl, td) = (args.token_ttl, args.trust_domain.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.map_err(|e| e.to_string())?;
            let sa = format!("sa-{i}");
            let token = workload(
                &client,
                &ns,
                &sa,
                &format!("app-{i}"),
                &node,
                &audience,
                ttl,
            )
            .await?;
            Ok::<_, String>((
                i,
                TokenLine {
                    identity: format!("spiffe://{td}/ns/{ns}/sa/{sa}"),
                    token,
                },
            ))
        });
    }
    let mut lines = Vec::with_capacity(args.workloads);
    while let Some(done) = tasks.join_next().await {
        lines.push(done.map_err(|e| e.to_string())??);
    }
    lines.sort_by_key(|(i, _)| *i);
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.tokens)
            .map_err(|e| format!("{}: {e}", args.tokens.display()))?,
    );
    for (_, line) in &lines {
        let json = serde_json::to_string(line).map_err(|e| e.to_string())?;
        writeln!(out, "{json}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    eprintln!(
        "created {} service accounts, pods and pod-bound tokens in {} on {} (+ {} and its pod) in {:.1}s",
        args.workloads,
        args.namespace,
        args.node,
        args.node_agent,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
