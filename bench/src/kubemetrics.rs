//! The API server's own count of TokenReviews: `apiserver_request_total`
//! with `resource="tokenreviews"` and `verb="POST"`, summed over the other
//! labels (response code, scope, ...), from its `/metrics` endpoint.
//! Read before and after a run, the difference is what the CA under test
//! asked for, counted the same way for every server.

use std::path::Path;

use kube::Client;

/// A connection to one API server (the kubeconfig's current context).
pub struct ApiServerMetrics {
    client: Client,
}

/// TokenReviews the API server has answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenReviewCount {
    pub total: u64,
    /// Answered with another code than 201 Created.
    pub failed: u64,
}

impl TokenReviewCount {
    pub fn since(&self, before: &TokenReviewCount) -> TokenReviewCount {
        TokenReviewCount {
            total: self.total.saturating_sub(before.total),
            failed: self.failed.saturating_sub(before.failed),
        }
    }
}

impl ApiServerMetrics {
    pub async fn connect(kubeconfig: &Path) -> Result<Self, String> {
        Ok(Self {
            client: crate::kube_setup::client(kubeconfig).await?,
        })
    }

    pub async fn token_reviews(&self) -> Result<TokenReviewCount, String> {
        let request = hyper::Request::get("/metrics")
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        let text = self
            .client
            .request_text(request)
            .await
            .map_err(|e| format!("API server /metrics: {e}"))?;
        Ok(parse(&text))
    }
}

/// Sums the TokenReview POST samples of `apiserver_request_total`.
fn parse(text: &str) -> TokenReviewCount {
    let mut count = TokenReviewCount::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        if !labels.contains(r#"resource="tokenreviews""#) || !labels.contains(r#"verb="POST""#) {
            continue;
        }
        let n = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        count.total += n;
        if !labels.contains(r#"code="201""#) {
            count.failed += n;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_tokenreview_posts() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="201",component="apiserver",dry_run="",group="authentication.k8s.io",resource="tokenreviews",scope="resource",subresource="",verb="POST",version="v1"} 7
apiserver_request_total{code="500",component="apiserver",dry_run="",group="authentication.k8s.io",resource="tokenreviews",scope="resource",subresource="",verb="POST",version="v1"} 2
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 40
"#;
        let c = super::parse(text);
        assert_eq!((c.total, c.failed), (9, 2));
    }
}
