-- Run once by the postgres image on an empty data volume (compose.yaml).
-- The audit chain's anchors go to a database of their own (audit.anchor in config.yaml), so that
-- rewriting the audit database does not rewrite its anchors. On one server with one role this
-- only separates them; in production give the anchors a server or role the audit admin lacks.
CREATE DATABASE safeedit_anchors;
