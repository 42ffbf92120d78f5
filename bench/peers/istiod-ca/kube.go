package main

// The Kubernetes half of istiod's CA, against a real API server: istiod's
// kube client (pilot/pkg/bootstrap initKubeClient), its multicluster
// controller (initMulticluster), the KubeJWTAuthenticator (NewServer) that
// checks every bearer token with a TokenReview, and, through caserver.New and
// CA_TRUSTED_NODE_ACCOUNTS, the node authorizer with its pod informer. Only
// the order of the calls and the flags are written here.

import (
	"fmt"
	"time"

	"k8s.io/client-go/rest"

	"istio.io/istio/pkg/cluster"
	"istio.io/istio/pkg/config/mesh/meshwatcher"
	kubelib "istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/kube/multicluster"
	"istio.io/istio/pkg/log"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/server/ca/authenticate/kubeauth"
)

// kubeSetup is what the CA server needs from Kubernetes.
type kubeSetup struct {
	client       kubelib.Client
	multicluster *multicluster.Controller
	authn        security.Authenticator
}

// newKube builds istiod's kube client from a kubeconfig, with
// --kubernetesApiQPS / --kubernetesApiBurst applied as initKubeClient does,
// the multicluster controller for the config cluster (its remote-secret
// watch in the system namespace included) and the KubeJWTAuthenticator.
func newKube(o *options, meshWatcher meshwatcher.WatcherCollection) (*kubeSetup, error) {
	qps := func(c *rest.Config) {
		c.QPS = o.kubeQPS
		c.Burst = o.kubeBurst
	}
	restConfig, err := kubelib.DefaultRestConfig(o.kubeconfig, "", qps)
	if err != nil {
		return nil, fmt.Errorf("failed creating kube config: %v", err)
	}
	clusterID := cluster.ID(o.clusterID)
	client, err := kubelib.NewClient(kubelib.NewClientConfigForRestConfig(restConfig), clusterID)
	if err != nil {
		return nil, fmt.Errorf("failed creating kube client: %v", err)
	}
	// As initKubeClient does; the multicluster controller's informers need it.
	client = kubelib.EnableCrdWatcher(client)
	mc := multicluster.NewController(multicluster.ControllerOptions{
		Client:          client,
		ClusterID:       clusterID,
		SystemNamespace: o.systemNamespace,
		MeshConfig:      meshWatcher,
		ConfigOverrides: []func(*rest.Config){qps},
	})
	if mc == nil {
		return nil, fmt.Errorf("failed creating the multicluster controller")
	}
	authn := kubeauth.NewKubeJWTAuthenticator(meshWatcher, client.Kube(), clusterID, nil, mc)
	log.Infof("kube client for cluster %q at %s (QPS %v, burst %d)", clusterID, restConfig.Host, restConfig.QPS, restConfig.Burst)
	return &kubeSetup{client: client, multicluster: mc, authn: authn}, nil
}

// start runs what istiod's start functions run for the CA: the multicluster
// controller (which builds the node authorizer and its pod informer for the
// config cluster), then the client's informers; then it waits, as istiod's
// Server.Start does (waitForCacheSync → cachesSynced) before it listens on
// 15012, until the multicluster controller, node authorizer included, has
// synced.
func (k *kubeSetup) start(stop chan struct{}) error {
	if err := k.multicluster.Run(stop); err != nil {
		return fmt.Errorf("multicluster controller: %v", err)
	}
	t0 := time.Now()
	if !k.client.RunAndWait(stop) {
		return fmt.Errorf("kube informers did not sync")
	}
	if !kubelib.WaitForCacheSync("server", stop, k.multicluster.HasSynced) {
		return fmt.Errorf("multicluster controller did not sync")
	}
	log.Infof("kube caches synced in %v", time.Since(t0))
	return nil
}
