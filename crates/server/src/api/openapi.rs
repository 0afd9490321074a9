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
    ))
)]
pub struct ApiDoc;
