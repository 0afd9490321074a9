-- Schema version 2: durable reply channels and webhook deliveries, both
-- written in the same transaction as the terminal transition they report.

CREATE TABLE channel_messages (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- append order
    deliveries  integer NOT NULL DEFAULT 0,
    visible_at  timestamptz NOT NULL,          -- hidden until then after a receive
    created_at  timestamptz NOT NULL,
    tenant      text COLLATE "C" NOT NULL,
    channel     text COLLATE "C" NOT NULL,
    message_id  text NOT NULL UNIQUE,
    request_id  text NOT NULL,
    ack_token   text,                          -- the token of the current delivery
    body        text NOT NULL                  -- ReplyMessage JSON
);
-- Receives: a channel's messages in append order.
CREATE INDEX channel_messages_ready ON channel_messages (tenant, channel, seq);
-- Redelivery wake-ups and retention.
CREATE INDEX channel_messages_visible ON channel_messages (visible_at) WHERE deliveries > 0;
CREATE INDEX channel_messages_created ON channel_messages (created_at);
CREATE UNIQUE INDEX channel_messages_ack ON channel_messages (ack_token) WHERE ack_token IS NOT NULL;

CREATE TABLE webhook_deliveries (
    message_id      text PRIMARY KEY,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,               -- due (or leased-until) while pending
    created_at      timestamptz NOT NULL,
    state           text NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    request_id      text NOT NULL,
    url             text NOT NULL,
    body            text NOT NULL              -- ReplyMessage JSON, exactly what is POSTed
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
