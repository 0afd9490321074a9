-- Schema version 2: durable reply channels and webhook deliveries, both
-- written in the same transaction as the terminal transition they report.

CREATE TABLE channel_messages (
    seq         INTEGER PRIMARY KEY,          -- append order
    tenant      TEXT NOT NULL,
    channel     TEXT NOT NULL,
    message_id  TEXT NOT NULL UNIQUE,
    request_id  TEXT NOT NULL,
    body        TEXT NOT NULL,                -- ReplyMessage JSON
    visible_at  INTEGER NOT NULL,             -- hidden until then after a receive
    deliveries  INTEGER NOT NULL DEFAULT 0,
    ack_token   TEXT,                         -- the token of the current delivery
    created_at  INTEGER NOT NULL
);
-- Receives: a channel's messages in append order.
CREATE INDEX channel_messages_ready ON channel_messages (tenant, channel, seq);
-- Redelivery wake-ups and retention.
CREATE INDEX channel_messages_visible ON channel_messages (visible_at) WHERE deliveries > 0;
CREATE INDEX channel_messages_created ON channel_messages (created_at);
CREATE UNIQUE INDEX channel_messages_ack ON channel_messages (ack_token) WHERE ack_token IS NOT NULL;

CREATE TABLE webhook_deliveries (
    message_id      TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,            -- ReplyMessage JSON, exactly what is POSTed
    attempts        INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL,            -- pending | delivered | failed
    next_attempt_at INTEGER,                  -- due (or leased-until) while pending
    created_at      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
