//! A real Kubernetes API server for the tests (`tests/kube/apiserver.sh`):
//! started once per test binary and shared by its tests, stopped by a
//! watchdog when the test process exits. Objects are created through the
//! API with the `kube` client, as an operator or kubelet would.
//!
//! Without the binaries (never built on this machine) the tests print SKIP
//! and pass, unless `MESHSIGN_REQUIRE_KUBE=1` (set by `tests/run-all.sh`),
//! which makes a missing API server a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// The shared API server of this test binary.
pub struct KubeApiServer {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub server: String,
    pub bin_dir: PathBuf,
}

static SERVER: OnceLock<Option<KubeApiServer>> = OnceLock::new();

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube/apiserver.sh")
}

impl KubeApiServer {
    /// The shared server, started on first use; `None` (after printing SKIP)
    /// when the binaries are not built and the API server is not required.
    pub fn shared() -> Option<&'static KubeApiServer> {
        SERVER.get_or_init(Self::start).as_ref()
    }

    /// Another API server of its own (a second cluster); `None` as for [`shared`](Self::shared).
    pub fn start_another() -> Option<KubeApiServer> {
        Self::start()
    }

    fn start() -> Option<KubeApiServer> {
        let required = std::env::var("MESHSIGN_REQUIRE_KUBE").is_ok_and(|v| v == "1");
        // Only `build` when the binaries exist or are required: building takes minutes.
        let cache = std::env::var("MESHSIGN_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/meshsign-test")
            });
        let built = std::fs::read_dir(&cache)
            .map(|d| {
                d.flatten().any(|e| {
                    let p = e.path();
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("kube-v"))
                        && !p.to_string_lossy().ends_with(".tmp")
                        && p.join("kube-apiserver").exists()
                })
            })
            .unwrap_or(false);
        if !built && !required {
            eprintln!(
                "SKIP: no kube-apiserver built (tests/kube/apiserver.sh build); \
                 set MESHSIGN_REQUIRE_KUBE=1 to fail instead"
            );
            return None;
        }
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("meshsign-kube-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .arg(std::process::id().to_string())
            .output()
            .expect("run tests/kube/apiserver.sh");
        assert!(
            out.status.success(),
            "kube-apiserver did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.join("env")).expect("env file");
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .expect(k)
                .to_owned()
        };
        Some(KubeApiServer {
            kubeconfig: dir.join("kubeconfig"),
            server: get("KUBE_SERVER"),
            bin_dir: PathBuf::from(get("KUBE_BIN_DIR")),
            dir,
        })
    }

    /// A client for the current test's runtime (admin).
    pub async fn client(&self) -> Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("kube config");
        Client::try_from(config).expect("kube client")
    }

    /// Runs kubectl against this server.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl")
    }
}

/// Object helpers for one test, on its own client.
pub struct Kube {
    pub client: Client,
}

impl Kube {
    pub async fn new(server: &KubeApiServer) -> Kube {
        Kube {
            client: server.client().await,
        }
    }

    pub async fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
    }

    pub async fn service_account(&self, ns: &str, name: &str) {
        let sa = ServiceAccount {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await
            .expect("create service account");
    }

    pub async fn delete_service_account(&self, ns: &str, name: &str) {
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete service account");
    }

    /// A pod "running" on `node` (no kubelet here: phase set through the
    /// status subresource). Returns its UID.
    pub async fn pod(&self, ns: &str, name: &str, sa: &str, node: &str) -> String {
        let pod = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
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
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        let created = api
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
        self.set_pod_phase(ns, name, "Running").await;
        created.metadata.uid.expect("pod uid")
    }

    pub async fn set_pod_phase(&self, ns: &str, name: &str, phase: &str) {
        Api::<Pod>::namespaced(self.client.clone(), ns)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": { "phase": phase } })),
            )
            .await
            .expect("patch pod status");
    }

    /// Force-deletes a pod (there is no kubelet to finish a graceful delete).
    pub async fn delete_pod(&self, ns: &str, name: &str) {
        Api::<Pod>::namespaced(self.client.clone(), ns)
            .delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await
            .expect("delete pod");
    }

    /// A service-account token from the TokenRequest API, bound to `pod`
    /// when given (as kubelet's projected tokens are).
    pub async fn token(
        &self,
        ns: &str,
        sa: &str,
        audience: &str,
        pod: Option<(&str, &str)>,
    ) -> String {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.into()],
                expiration_seconds: Some(3600),
                bound_object_ref: pod.map(|(name, uid)| BoundObjectReference {
                    kind: Some("Pod".into()),
                    api_version: Some("v1".into()),
                    name: Some(name.into()),
                    uid: Some(uid.into()),
                }),
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create_token_request(sa, &PostParams::default(), &request)
            .await
            .expect("token request")
            .status
            .expect("token status")
            .token
    }
}
