//! Root distribution (to be written).

use crate::config::RootPublisherConfig;

/// Keeps the root bundle published in one cluster for as long as it runs.
pub async fn run(
    client: kube::Client,
    cluster: String,
    settings: RootPublisherConfig,
    roots: tokio::sync::watch::Receiver<String>,
) {
    let _ = (client, cluster, settings, roots);
}
