//! The OpenAPI 3.1 document, generated from the handlers' annotations and
//! the wire types, so it cannot drift from the code.

use coatcheck_core::history::{EventKind, HistoryEvent};
use coatcheck_core::model::{ErrorInfo, ReplyTo, Request, Status, WebhookTarget};
use coatcheck_core::wire::*;

/// The API document.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "coatcheck",
        description = "Asynchronous Request-Reply: submit, get a ticket, get the reply when it is ready."
    ),
    paths(
        super::requests::submit,
        super::requests::status,
        super::requests::result,
        super::requests::history,
        super::requests::cancel,
        super::requests::list,
        super::requests::redrive,
        super::worker::claim,
        super::worker::heartbeat,
        super::worker::complete,
        super::worker::fail,
        super::worker::settlements,
        super::events::events,
        super::channels::receive,
        super::channels::ack,
        super::channels::events,
        super::ops::queues,
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        super::ops::openapi,
        super::ops::index,
    ),
    components(schemas(
        Request,
        Status,
        ErrorInfo,
        ReplyTo,
        WebhookTarget,
        HistoryEvent,
        EventKind,
        SubmitBody,
        ClaimBody,
        ClaimedRequest,
        ClaimResponse,
        HeartbeatBody,
        HeartbeatResponse,
        CompleteBody,
        FailBody,
        SettlementItem,
        SettlementsBody,
        SettlementResult,
        SettlementsResponse,
        ListResponse,
        HistoryResponse,
        QueueInfo,
        QueuesResponse,
        Problem,
        ReplyMessage,
        ChannelMessage,
        ChannelMessages,
        AckBody,
        AckResponse,
    )),
    modifiers(&ProblemResponses)
)]
pub struct ApiDoc;

/// The media type of every error answer (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Declares the problem answers every operation can give besides its own,
/// so that the document lists every 4xx (and 503) the server may send:
///
/// - every route: `414` (URL too long) and `431` (headers too large), from
///   the size guard in front of the router;
/// - routes with parameters or a body: `400`; routes with a path template:
///   `404` (an unknown id — or an empty segment, which names no route);
/// - routes with a JSON body: `408` (body too slow), `413` (too large),
///   `415` (not JSON);
/// - routes that need a key: `401`, `403`, `429` (rate, depth and stream
///   limits) and `503` (the store is unavailable).
///
/// It also moves every problem answer (a response whose schema is
/// [`Problem`]) to `application/problem+json`, the media type the server
/// sends them with; handlers annotate them with `body = Problem`.
pub struct ProblemResponses;

/// Routes that answer without a key and without the store.
const OPEN_ROUTES: &[&str] = &["/healthz", "/openapi.json"];

fn problem_ref() -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    utoipa::openapi::RefOr::Ref(utoipa::openapi::Ref::from_response_name("Problem"))
}

fn is_problem_schema(content: &utoipa::openapi::Content) -> bool {
    matches!(&content.schema, Some(utoipa::openapi::RefOr::Ref(r)) if r.ref_location.ends_with("/Problem"))
}

impl utoipa::Modify for ProblemResponses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{Content, RefOr, Response};

        let components = doc.components.get_or_insert_with(Default::default);
        let mut problem = Response::new(
            "An RFC 9457 problem document: `type`, `title`, `status`, `detail`, and \
             extension members such as `field`.",
        );
        problem.content.insert(
            PROBLEM_JSON.to_string(),
            Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                "Problem",
            )))),
        );
        components
            .responses
            .insert("Problem".to_string(), RefOr::T(problem));

        for (path, item) in doc.paths.paths.iter_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                // Problem answers are application/problem+json.
                for resp in op.responses.responses.values_mut() {
                    if let RefOr::T(r) = resp {
                        if let Some(c) = r.content.get("application/json") {
                            if is_problem_schema(c) {
                                let c = c.clone();
                                r.content.shift_remove("application/json");
                                r.content.insert(PROBLEM_JSON.to_string(), c);
                            }
                        }
                    }
                }
                let mut codes: Vec<&str> = vec!["414", "431"];
                let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
                let has_body = op.request_body.is_some();
                if has_params || has_body {
                    codes.push("400");
                }
                if path.contains('{') {
                    codes.push("404");
                }
                if has_body {
                    codes.extend(["408", "413", "415"]);
                }
                if !OPEN_ROUTES.contains(&path.as_str()) {
                    codes.extend(["401", "403", "429", "503"]);
                }
                for code in codes {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(problem_ref);
                }
            }
        }
        add_links(doc);
    }
}

/// OpenAPI links for what a client cannot guess: the worker calls need the
/// lease token of a claim, and redrive needs a request that failed. They
/// document the flow, and let stateful fuzzers (schemathesis) walk it.
///
/// Written as JSON under the response's `links` key rather than with
/// utoipa's `Link`, which (in utoipa 5.5) serializes its fields in
/// snake_case (`operation_id`, `request_body`) — not OpenAPI.
fn add_links(doc: &mut utoipa::openapi::OpenApi) {
    use serde_json::json;
    use utoipa::openapi::RefOr;

    let claimed_id = "$response.body#/requests/0/id";
    let claimed_token = json!({"lease_token": "$response.body#/requests/0/lease_token"});
    let links = [
        (
            "/v1/queues/{queue}/requests",
            "202",
            "ClaimIt",
            "claim",
            ("path.queue", "$response.body#/queue"),
            None,
        ),
        (
            "/v1/queues/{queue}/claims",
            "200",
            "CompleteIt",
            "complete",
            ("path.id", claimed_id),
            Some(claimed_token.clone()),
        ),
        (
            "/v1/queues/{queue}/claims",
            "200",
            "HeartbeatIt",
            "heartbeat",
            ("path.id", claimed_id),
            Some(claimed_token.clone()),
        ),
        (
            "/v1/queues/{queue}/claims",
            "200",
            "FailIt",
            "fail",
            ("path.id", claimed_id),
            Some(claimed_token),
        ),
        (
            "/v1/requests/{id}/fail",
            "200",
            "RedriveIt",
            "redrive",
            ("path.id", "$response.body#/id"),
            None,
        ),
        (
            "/v1/requests/{id}/complete",
            "200",
            "GetResult",
            "result",
            ("path.id", "$response.body#/id"),
            None,
        ),
    ];
    for (path, code, name, target, (param, expr), body) in links {
        let Some(item) = doc.paths.paths.get_mut(path) else {
            continue;
        };
        let Some(op) = item.post.as_mut() else {
            continue;
        };
        let Some(RefOr::T(resp)) = op.responses.responses.get_mut(code) else {
            continue;
        };
        let mut link = json!({"operationId": target, "parameters": {param: expr}});
        if let Some(body) = body {
            link["requestBody"] = body;
        }
        let extensions = resp.extensions.get_or_insert_with(Default::default);
        let links = extensions
            .entry("links".to_string())
            .or_insert_with(|| json!({}));
        links[name] = link;
    }
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi;

    use super::*;

    /// Every operation declares its problem answers, as problem+json.
    #[test]
    fn every_operation_declares_problem_answers() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("serializes");
        let paths = doc["paths"].as_object().expect("paths");
        assert!(!paths.is_empty());
        let mut ids = std::collections::HashSet::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("item") {
                let responses = op["responses"].as_object().expect("responses");
                for code in ["414", "431"] {
                    assert!(responses.contains_key(code), "{method} {path}: {code}");
                }
                if op.get("requestBody").is_some() {
                    for code in ["400", "408", "413", "415"] {
                        assert!(responses.contains_key(code), "{method} {path}: {code}");
                    }
                }
                if path.contains('{') {
                    assert!(responses.contains_key("404"), "{method} {path}: 404");
                }
                let id = op["operationId"].as_str().expect("operationId");
                assert!(ids.insert(id.to_string()), "operationId {id} is not unique");
                for (code, r) in responses {
                    if code.starts_with('4') || code.starts_with('5') {
                        let text = r.to_string();
                        assert!(
                            text.contains("#/components/responses/Problem")
                                || text.contains(PROBLEM_JSON),
                            "{method} {path} {code}: {text}"
                        );
                        assert!(
                            !text.contains("\"application/json\""),
                            "{method} {path} {code}: {text}"
                        );
                    }
                }
            }
        }
    }
}
