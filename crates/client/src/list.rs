//! Listing requests: one page at a time ([`Client::list_page`]) or as a
//! stream that follows `next_page_token` (AIP-158) until the last page
//! ([`Client::list`]).
//!
//! Key decisions: the stream owns a clone of the client, so it is `'static`
//! and can be moved into a task; it fetches the next page only when the
//! current one is used up, and ends after the first error.

use std::collections::VecDeque;
use std::time::Duration;

use coatcheck_core::wire::ListResponse;
use coatcheck_core::{Request, Status};
use futures::Stream;
use reqwest::Method;

use crate::client::Client;
use crate::error::Result;
use crate::http::{self, Replay};

/// Filters for [`Client::list`]; every field is optional.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only requests in this status.
    pub status: Option<Status>,
    /// Only requests with this correlation id.
    pub correlation_id: Option<String>,
    /// Page size (the server applies its own default and cap).
    pub limit: Option<u32>,
}

impl ListQuery {
    /// No filters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only this queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Only requests in this status.
    pub fn status(mut self, status: Status) -> Self {
        self.status = Some(status);
        self
    }

    /// Only requests with this correlation id.
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Page size.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    fn params(&self, page_token: Option<&str>) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if let Some(q) = &self.queue {
            p.push(("queue", q.clone()));
        }
        if let Some(s) = self.status {
            p.push(("status", s.as_str().to_string()));
        }
        if let Some(c) = &self.correlation_id {
            p.push(("correlation_id", c.clone()));
        }
        if let Some(l) = self.limit {
            p.push(("limit", l.to_string()));
        }
        if let Some(t) = page_token {
            p.push(("page_token", t.to_string()));
        }
        p
    }
}

impl Client {
    /// `GET /v1/requests`: one page, newest first.
    pub async fn list_page(
        &self,
        query: &ListQuery,
        page_token: Option<&str>,
    ) -> Result<ListResponse> {
        let t = self.transport();
        let rb = t
            .request(Method::GET, t.url(&["v1", "requests"])?, Duration::ZERO)
            .query(&query.params(page_token));
        http::json(t.send(rb, Replay::Safe).await?).await
    }

    /// Every request matching `query`, newest first, fetching pages as the
    /// stream is consumed. An error ends the stream after it is yielded.
    pub fn list(&self, query: ListQuery) -> impl Stream<Item = Result<Request>> + Send + 'static {
        let state = ListState {
            client: self.clone(),
            query,
            token: None,
            buf: VecDeque::new(),
            done: false,
        };
        futures::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(r) = s.buf.pop_front() {
                    return Some((Ok(r), s));
                }
                if s.done {
                    return None;
                }
                match s.client.list_page(&s.query, s.token.as_deref()).await {
                    Ok(page) => {
                        s.buf.extend(page.requests);
                        s.token = page.next_page_token.filter(|t| !t.is_empty());
                        s.done = s.token.is_none();
                    }
                    Err(e) => {
                        s.done = true;
                        return Some((Err(e), s));
                    }
                }
            }
        })
    }
}

struct ListState {
    client: Client,
    query: ListQuery,
    token: Option<String>,
    buf: VecDeque<Request>,
    done: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        let q = ListQuery::new()
            .queue("thumbs")
            .status(Status::Failed)
            .correlation_id("order 42&x")
            .limit(10);
        let p = q.params(Some("tok"));
        assert_eq!(
            p,
            vec![
                ("queue", "thumbs".to_string()),
                ("status", "failed".to_string()),
                ("correlation_id", "order 42&x".to_string()),
                ("limit", "10".to_string()),
                ("page_token", "tok".to_string()),
            ]
        );
        assert!(ListQuery::new().params(None).is_empty());
    }
}
